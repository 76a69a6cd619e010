"""The Falcon-H1 family's published shapes, as random-weight presets (h1tune.presets builds them).

    h1tune init-model runs/t90 --preset tiny-90m        # buildable: up to 1.5B-Deep
    build_model("34b", device="meta")                   # every shape: parameter counts, memory plans

Each shape says where its values come from and which were inferred (`INFERRED`): most hub pages
could only be read in part offline. Multipliers (μP) are kept from the 0.5B config unless a
model's own were read; they change numbers, not shapes or memory.
"""

from __future__ import annotations

from typing import Any

# Falcon-H1-Tiny 90M (-Instruct, -R, tool-calling): shape from copies of tiiuae/Falcon-H1-Tiny-R-90M's and
# -90M-Instruct's config.json (mlx-community, CompactAI); 91.1M parameters with tied embeddings.
_TINY_90M: dict[str, Any] = {
    "vocab_size": 32768, "hidden_size": 512, "intermediate_size": 768, "num_hidden_layers": 24,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
    "mamba_d_ssm": 768, "mamba_n_heads": 24, "mamba_d_head": 32, "mamba_d_state": 64, "mamba_n_groups": 1,
    "mamba_chunk_size": 128, "max_position_embeddings": 262144, "tie_word_embeddings": True,
    "embedding_multiplier": 0.11083984375, "lm_head_multiplier": 0.078125, "key_multiplier": 1.0,
    "attention_in_multiplier": 1.0, "attention_out_multiplier": 1.0, "ssm_in_multiplier": 1.0,
    "ssm_out_multiplier": 1.0, "mlp_multipliers": [1.0, 1.0],
}
# The transformers Falcon-H1 doc table (TII): depth, width, heads, d_head, d_state for every size.
# 3B: intermediate_size and vocab_size read nowhere offline; 6144 and 65537 give the 3,149.4M parameters a
# model list reports. 7B / 34B: NVIDIA Megatron-Bridge falconh1_provider.py ("from config.json").
_3B = dict(vocab_size=65537, hidden_size=2560, intermediate_size=6144, num_hidden_layers=32, num_attention_heads=10,
           num_key_value_heads=2, head_dim=128, mamba_d_ssm=4096, mamba_n_heads=32, mamba_d_head=128,
           mamba_d_state=256, mamba_n_groups=1, mamba_rms_norm=True, max_position_embeddings=131072)
_7B = dict(vocab_size=130049, hidden_size=3072, intermediate_size=12288, num_hidden_layers=44, num_attention_heads=12,
           num_key_value_heads=2, head_dim=128, mamba_d_ssm=3072, mamba_n_heads=24, mamba_d_head=128,
           mamba_d_state=256, mamba_n_groups=1, mamba_rms_norm=True, max_position_embeddings=262144)

SHAPES: dict[str, dict[str, Any]] = {
    "tiny-90m": _TINY_90M,
    "tiny-100m": {**_TINY_90M, "vocab_size": 49152},
    "0.5b": {
        "vocab_size": 32784, "hidden_size": 1024, "intermediate_size": 2048, "num_hidden_layers": 36,
        "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
        "mamba_d_ssm": 1536, "mamba_n_heads": 24, "mamba_d_head": 64, "mamba_d_state": 128,
        "mamba_chunk_size": 128, "max_position_embeddings": 16384,
    },
    "1.5b": {
        "vocab_size": 65537, "hidden_size": 2048, "intermediate_size": 4608, "num_hidden_layers": 24,
        "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128,
        "mamba_d_ssm": 3072, "mamba_n_heads": 48, "mamba_d_head": 64, "mamba_d_state": 256,
        "mamba_chunk_size": 128, "max_position_embeddings": 131072,
    },
    "1.5b-deep": {
        "vocab_size": 65537, "hidden_size": 1280, "intermediate_size": 3072, "num_hidden_layers": 66,
        "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 128,
        "mamba_d_ssm": 1536, "mamba_n_heads": 24, "mamba_d_head": 64, "mamba_d_state": 256,
        "mamba_chunk_size": 128, "max_position_embeddings": 131072,
    },
    "3b": _3B,
    "7b": _7B,
    "34b": dict(vocab_size=261120, hidden_size=5120, intermediate_size=21504, num_hidden_layers=72,
                num_attention_heads=20, num_key_value_heads=4, head_dim=128, mamba_d_ssm=4096, mamba_n_heads=32,
                mamba_d_head=128, mamba_d_state=256, mamba_n_groups=2, mamba_rms_norm=True,
                max_position_embeddings=262144),
    "h1r-7b": _7B,  # Falcon-H1R-7B is built on Falcon-H1-7B-Base (model card); same shape
}

# Values no offline source gave, chosen as said (docs/distributed.md and the README repeat this).
INFERRED: dict[str, str] = {
    "tiny-90m": "multipliers from a copy of -90M-Instruct's config (R-90M's embedding_multiplier is 0.0344)",
    "tiny-100m": "vocab_size 49152 (its tokenizer is about twice the 90M's; gives ~100M parameters); the rest as 90M",
    "0.5b": "vocab_size 32784; ssm multipliers",
    "1.5b-deep": "intermediate_size 3072 and vocab_size 65537 (give the published ~1.55B); mamba_d_ssm = 24 x 64",
    "3b": "intermediate_size 6144 and vocab_size 65537 (give the reported 3,149.4M parameters)",
    "h1r-7b": "the 7B shape; its chat template (reasoning in <think>) was not read",
}

# The chat format each preset's tokenizer carries (h1tune.templates); the rest use "h1".
CHAT_FORMAT = {"tiny-90m": "h1tiny", "tiny-100m": "h1tiny", "h1r-7b": "h1r"}

# Above this many parameters a preset is a shape only (meta device): random fp32 weights would need >8 GiB.
BUILD_LIMIT = 2_000_000_000
