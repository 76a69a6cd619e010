"""Embedded Falcon-H1 checkpoints with random weights, and a tokenizer built locally.

    h1tune init-model runs/tiny --preset tiny

Tests and the offline quickstart need a real Falcon-H1 (the same `FalconH1ForCausalLM` code path)
without a model hub. `tiny` trains a step in about a second on a CPU (`tiny-h1r`, `tiny-h1tiny`: the
same with Falcon-H1R's and Falcon-H1-Tiny's chat formats); `tiny-90m` ... `34b`, `h1r-7b` have the
family's published shapes (family.py; up to 1.5B-Deep buildable, all on the meta device).
The μP multipliers of the published 0.5B config are kept in every preset but the Tiny ones: they live
in the forward pass, so a tool that drops them would be caught here.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from h1tune.errors import H1tuneError
from h1tune.family import BUILD_LIMIT, CHAT_FORMAT, SHAPES
from h1tune.templates import CHAT_FORMATS

BOS, EOS_TEXT, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
END_OF_TURN_TOKENS = (IM_END, EOS_TEXT)  # generation stops at either (real Falcon-H1 tokenizers have both)
SPECIAL_TOKENS = [PAD, BOS, EOS_TEXT, IM_START, IM_END, "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

CHAT_TEMPLATE = CHAT_FORMATS["h1"]  # Falcon-H1-Instruct's ChatML (h1tune.templates)

# μP multipliers of Falcon-H1-0.5B's config.json (attention_in/out and ssm_multipliers keep the
# config defaults, as we could not read those values offline).
_MUP_05B: dict[str, Any] = {
    "key_multiplier": 0.390625,
    "lm_head_multiplier": 0.0390625,
    "embedding_multiplier": 5.657,
    "ssm_in_multiplier": 1.25,
    "ssm_out_multiplier": 0.2357,
    "mlp_multipliers": [0.884, 0.586],
}

_COMMON: dict[str, Any] = {
    "hidden_act": "silu",
    "mamba_d_conv": 4,
    "mamba_n_groups": 1,
    "mamba_conv_bias": True,
    "mamba_proj_bias": False,
    "mamba_rms_norm": False,
    "mamba_norm_before_gate": False,
    "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e11},
    "rms_norm_eps": 1e-5,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 4,  # <|im_end|>: chat generation stops at the end of the assistant turn
    **_MUP_05B,
}

_TINY = {
    "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
    "mamba_d_ssm": 256, "mamba_n_heads": 8, "mamba_d_head": 32, "mamba_d_state": 64,
    "mamba_chunk_size": 128, "max_position_embeddings": 4096,
}
# tiny: the test shape. tiny-h1r / tiny-h1tiny: the same, with the H1R reasoning and the H1-Tiny chat
# formats, so every format path is tested offline. The rest: the family's published shapes (family.py).
PRESETS: dict[str, dict[str, Any]] = {"tiny": _TINY, "tiny-h1r": _TINY, "tiny-h1tiny": _TINY, **SHAPES}
PRESET_CHAT_FORMAT = {"tiny-h1r": "h1r", "tiny-h1tiny": "h1tiny", **CHAT_FORMAT}
PRESET_BUILD = 3  # bump when build_model/build_tokenizer change, so cached presets are rebuilt
TOKENIZER_VOCAB = 1024  # the tokenizer is the same for every preset; larger model vocabs leave rows unused


def preset_config(preset: str, **overrides: Any):
    """The `FalconH1Config` of a preset; `overrides` change any field (tests make long-memory SSMs)."""
    from transformers import FalconH1Config

    if preset not in PRESETS:
        raise H1tuneError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    return FalconH1Config(**{**_COMMON, **PRESETS[preset], **overrides})


def build_model(preset: str = "tiny", seed: int = 0, device: str | None = None, **overrides: Any):
    """A random-weight `FalconH1ForCausalLM` (fp32). Use device="meta" to count parameters for free."""
    import torch
    from transformers import FalconH1ForCausalLM

    config = preset_config(preset, **overrides)
    torch.manual_seed(seed)
    if device == "meta":
        with torch.device("meta"):
            return FalconH1ForCausalLM(config)
    model = FalconH1ForCausalLM(config).float().eval()
    # Trained Falcon-H1 weights have large norms that offset the small μP multipliers. With the
    # 0.02 init, lm_head_multiplier (0.039) caps every logit near 0.2 and nothing can be learned
    # through LoRA; give lm_head trained-like scale: unit-variance logits from a unit-RMS state.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0 / (config.lm_head_multiplier * config.hidden_size**0.5))
    return model


def corpus_lines() -> list[str]:
    """The text shipped in the package that the tokenizer is trained on."""
    text = resources.files("h1tune.resources").joinpath("corpus.txt").read_text(encoding="utf-8")
    quickstart = resources.files("h1tune.resources").joinpath("quickstart_sft.jsonl").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip()]
    for row in quickstart.splitlines():
        if row.strip():
            lines += [m["content"] for m in json.loads(row)["messages"]]
    return lines


def build_tokenizer(chat_format: str = "h1"):
    """A byte-level BPE tokenizer with Falcon-H1's special tokens and a family chat template (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus_lines(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=BOS, eos_token=IM_END, pad_token=PAD,
        additional_special_tokens=SPECIAL_TOKENS[5:], model_max_length=131072,
    )
    tokenizer.chat_template = CHAT_FORMATS[chat_format]
    return tokenizer


def refuse_unbuildable(preset: str) -> None:
    """Presets above BUILD_LIMIT parameters are shapes for memory plans (meta device), not random checkpoints."""
    if preset not in PRESETS:
        raise H1tuneError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    count = sum(p.numel() for p in build_model(preset, device="meta").parameters())
    if count > BUILD_LIMIT:
        raise H1tuneError(f"preset {preset!r} has {count / 1e9:.1f}B parameters ({4 * count / 2**30:.0f} GiB of random "
                          f"fp32 weights): it is a shape for memory plans and parameter counts (device='meta'); "
                          f"build one up to {BUILD_LIMIT / 1e9:.0f}B, or load the real checkpoint by its hub id")


def init_model(out_dir: str | Path, preset: str = "tiny", seed: int = 0, overwrite: bool = False) -> Path:
    """Write a preset checkpoint (safetensors) plus tokenizer to `out_dir`, atomically."""
    import shutil
    import tempfile

    from transformers import GenerationConfig

    from h1tune.atomic import publish_dir

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise H1tuneError(f"{out_dir} is not empty; choose another directory or pass --overwrite")
    refuse_unbuildable(preset)
    model = build_model(preset, seed=seed)
    tokenizer = build_tokenizer(PRESET_CHAT_FORMAT.get(preset, "h1"))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.convert_tokens_to_ids(IM_END),
                                                           tokenizer.convert_tokens_to_ids(EOS_TEXT)],
        pad_token_id=tokenizer.pad_token_id,
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "h1tune_preset.json").write_text(json.dumps({"preset": preset, "seed": seed, "build": PRESET_BUILD}))
        publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# The safe LoRA targets by leaf name (attention, mamba in_proj, mlp), for adapters built without a config.
FAKE_ADAPTER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "gate_proj", "up_proj", "down_proj"]


def save_fake_adapter(base_dir: str | Path, out: str | Path, *, r: int = 8, lora_alpha: float = 16,
                      targets: list[str] | None = None, seed: int = 1, std: float = 0.05) -> Path:
    """A peft LoRA adapter with random non-zero lora_B, standing in for a trained one.

    Tests and benches need an adapter that changes the logits (a fresh LoRA's lora_B is zero)
    without paying for a training run.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=lora_alpha,
                                                  target_modules=list(targets or FAKE_ADAPTER_TARGETS)))
    gen = torch.Generator().manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * std
    peft_model.save_pretrained(out)
    return Path(out)


def cached_preset(preset: str, seed: int = 0) -> Path:
    """The directory of an embedded preset, built on first use and reused after."""
    import os

    root = Path(os.environ.get("H1TUNE_CACHE", Path.home() / ".cache" / "h1tune")) / "presets"
    path = root / f"{preset}-seed{seed}"
    marker = path / "h1tune_preset.json"
    if not marker.is_file() or json.loads(marker.read_text()).get("build") != PRESET_BUILD:
        init_model(path, preset=preset, seed=seed, overwrite=True)
    return path


def long_memory(model, seed: int = 1):
    """Make every Mamba mixer remember far back (small decay rates, slow dt), in place.

    With the random init the SSM state fades within a few tokens, so a leak across a packed document
    boundary would hardly show; exactness tests and the GPU check use this to make one visible.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mamba.A_log.copy_(torch.log(torch.empty(layer.mamba.A_log.shape).uniform_(0.01, 0.1, generator=gen)))
            layer.mamba.dt_bias.fill_(-3.0)
    return model


def lora_past_mamba_guard(model, module_names: list[str], r: int = 8, lora_alpha: float = 16):
    """peft LoRA on exactly `module_names`, past peft's Mamba guard, which refuses out_proj and conv1d.

    h1tune refuses such adapters itself; tests and the GPU check build one to show the probe flags the
    kernel bypass. Never a training path.
    """
    import peft.tuners.tuners_utils as tuners_utils
    from peft import LoraConfig, get_peft_model

    guard = tuners_utils._check_lora_target_modules_mamba
    tuners_utils._check_lora_target_modules_mamba = lambda *a, **k: None
    try:
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(module_names),
                                                lora_dropout=0.0))
    finally:
        tuners_utils._check_lora_target_modules_mamba = guard
