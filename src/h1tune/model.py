"""Load a Falcon-H1 model and its tokenizer: hub id, local directory, or embedded preset; quantize it
for QLoRA and check afterwards that out_proj and lm_head stayed whole.

Safe by default: `trust_remote_code` off, safetensors only unless the user opts in.
`dtype: auto` loads bf16 on CUDA and fp32 on CPU here (evaluation, generation and merges compare
exactly in fp32); training decides its own precision by the CPU (h1tune.precision).
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from h1tune.config import ModelConfig
from h1tune.errors import ConfigError, H1tuneError
from h1tune.policy import ALWAYS_UNQUANTIZED
from h1tune.presets import PRESETS, cached_preset

if TYPE_CHECKING:
    import torch

log = logging.getLogger("h1tune")


def resolve_model_path(name_or_path: str, seed: int = 0) -> str:
    """An embedded preset name becomes its cached directory; anything else is passed through."""
    if name_or_path in PRESETS:
        return str(cached_preset(name_or_path, seed=seed))
    source_problem = model_source_problem(name_or_path)
    if source_problem:
        raise H1tuneError(f"model.name_or_path: {source_problem}")
    return name_or_path


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def model_source_problem(name: str) -> str | None:
    """Why `name` is neither a preset, an existing directory nor a hub id (`org/name`), or None.

    Without this, a missing local directory reads as a malformed hub id and a misspelled preset
    (`tinyy`) goes to the network.
    """
    if name in PRESETS or Path(name).expanduser().is_dir():
        return None
    # `runs/sft` when ./runs exists is a directory that is missing, not a hub id
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or (
        "/" in name and Path(name).parent.is_dir())
    if looks_like_path:
        return f"{name!r}: no such directory (cwd: {Path.cwd()})"
    if _HUB_ID.match(name):
        return None
    close = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.5)
    hint = f"; did you mean the preset {close[0]!r}?" if close else ""
    return (f"{name!r} is not a preset ({', '.join(PRESETS)}), a directory, or a hub id like "
            f"tiiuae/Falcon-H1-0.5B-Instruct{hint}")


def read_model_config(cfg: ModelConfig):
    """The checkpoint's path and config.json, checked without loading weights: Falcon-H1, safetensors
    present, no unsafe pre-quantization. Cheap, so a run calls it before it claims a directory."""
    from transformers import AutoConfig

    path = resolve_model_path(cfg.name_or_path, cfg.seed)
    try:
        hf_config = AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise H1tuneError(f"model.name_or_path: cannot load {path!r} ({exc}). Give a hub id, a local "
                          f"directory with config.json, or a preset ({', '.join(PRESETS)})") from None
    if hf_config.model_type != "falcon_h1":
        raise H1tuneError(f"model.name_or_path: {path!r} is a {hf_config.model_type!r} model; h1tune fine-tunes "
                          "Falcon-H1 (model_type falcon_h1) only")
    if Path(path).is_dir() and cfg.use_safetensors and not any(Path(path).glob("*.safetensors")):
        raise H1tuneError(f"model.name_or_path: {path!r} has no .safetensors weights; pickled weights can run "
                          "code when loaded. Convert them, or set model.use_safetensors: false if you trust them")
    problems = checkpoint_quantization_problems(hf_config)
    if problems:
        raise ConfigError(problems)
    return path, hf_config


def dtype_name(dtype: str) -> str:
    """The one place `auto` is resolved: bfloat16 on CUDA, float32 on CPU."""
    if dtype != "auto":
        return dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


def resolve_dtype(dtype: str) -> "torch.dtype":
    import torch

    return getattr(torch, dtype_name(dtype))


def mamba_path() -> str:
    """Which Mamba implementation the model's forward will use, in words."""
    import torch

    from h1tune import ssm

    kernels = all(importlib.util.find_spec(p) is not None for p in ("mamba_ssm", "causal_conv1d"))
    if kernels and torch.cuda.is_available():
        from h1tune.ssm import seam

        if seam.real_kernels_bound():
            return "fused CUDA kernels (mamba_ssm + causal_conv1d)"
        return "torch path: mamba_ssm/causal_conv1d are installed but transformers did not bind them (partial build?)"
    if ssm.is_installed():
        return "h1tune boundary-aware torch path (exact packing, no CUDA kernels)"
    return "transformers' torch fallback (slow; no mamba_ssm/causal_conv1d)"


def use_h1tune_mamba_kernels() -> None:
    """Put h1tune's Mamba kernels at transformers' seam for every run, packed or not.

    They are exact and faster than transformers' torch fallback (bench/profile_mamba.py), and on
    CUDA with mamba_ssm the seam still hands every call to the real kernels. Packing needs them
    (lm/batching.py installs them and fails there); plain batches only lose speed without them, so an
    unsupported transformers costs a warning here, not the run.
    """
    from h1tune import ssm

    try:
        ssm.install()
    except H1tuneError as exc:
        log.warning("%s; plain batches use transformers' own Mamba path", exc)


def skip_modules(user_modules: list[str]) -> list[str]:
    """The bitsandbytes skip list: out_proj and lm_head always, user additions merged in.

    The user list can only add: there is no spelling that removes out_proj or lm_head, so a config
    cannot quantize them. transformers matches each entry as a regex prefix or a suffix, so a
    malformed regex is refused here rather than deep inside from_pretrained.
    """
    import re

    problems = []
    for entry in user_modules:
        try:
            re.compile(entry)
        except re.error as exc:
            problems.append(f"model.llm_int8_skip_modules: {entry!r} is not a valid module name or regex ({exc})")
    if problems:
        raise ConfigError(problems)
    return list(dict.fromkeys([*ALWAYS_UNQUANTIZED, *user_modules]))


def quantization_config(cfg: ModelConfig, compute_dtype: "torch.dtype", shard_4bit: bool = False):
    """BitsAndBytesConfig for QLoRA, or None. NF4 with double quantization, compute in the training dtype.

    `shard_4bit` (QLoRA under FSDP) stores the packed 4-bit weights in the compute dtype instead of
    uint8: FSDP shards floating-point tensors only, and one dtype per layer (bitsandbytes' FSDP-QLoRA guide).
    """
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "4bit":
        storage = {"bnb_4bit_quant_storage": compute_dtype} if shard_4bit else {}
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=skip_modules(cfg.llm_int8_skip_modules),
            **storage,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules(cfg.llm_int8_skip_modules))


def keep_4bit_unpacked_on_cpu(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights on the first CPU forward.

    On CPUs with AVX512-BF16, bnb 0.50 repacks each Linear4bit in eval mode and asserts
    out_features % 32 == 0, which Falcon-H1's mamba.in_proj fails (2*d_ssm + 2*groups*d_state +
    n_heads, e.g. 648 in the tiny preset); the repacked layout would also break dequantize_4bit.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.name_or_path, cfg.seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise H1tuneError(f"model.name_or_path: cannot load a tokenizer from {path!r} ({exc})") from None
    if tokenizer.chat_template is None:
        raise H1tuneError(f"model.name_or_path: the tokenizer at {path!r} has no chat template; "
                          "use a Falcon-H1 Instruct checkpoint or an h1tune preset")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig, device_map: str | None = None, announce: bool = True, shard_4bit: bool = False):
    """Load `FalconH1ForCausalLM` per the config; quantized when `model.quantization` is set.

    bitsandbytes quantizes on the device it loads to: this process's GPU (LOCAL_RANK under a
    launcher, so N ranks do not all fill GPU 0). `shard_4bit`: see quantization_config.
    """
    import os

    import torch
    from transformers import AutoModelForCausalLM

    path, _ = read_model_config(cfg)
    dtype = resolve_dtype(cfg.dtype)
    use_h1tune_mamba_kernels()
    bnb = quantization_config(cfg, dtype, shard_4bit=shard_4bit)
    if bnb is not None and device_map is None:
        device_map = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        path,
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        use_safetensors=cfg.use_safetensors,
        dtype=dtype,
        attn_implementation=cfg.attn_implementation,
        quantization_config=bnb,
        device_map=device_map,
    )
    if bnb is not None:
        verify_unquantized(model)
        keep_4bit_unpacked_on_cpu(model)
    if announce:
        quant = f", {cfg.quantization} base weights (out_proj and lm_head kept whole)" if bnb is not None else ""
        log.info("model %s: dtype %s%s; Mamba path: %s", cfg.name_or_path, str(dtype).replace("torch.", ""),
                 quant, mamba_path())
    return model


def verify_unquantized(model) -> None:
    """Fail loudly if bitsandbytes quantized a mamba.out_proj or the lm_head."""
    # remove_duplicate=False: a quantized module shared under a second name must be seen there too.
    bad = [name for name, module in model.named_modules(remove_duplicate=False)
           if type(module).__name__ in ("Linear4bit", "Linear8bitLt")
           and (name.endswith("mamba.out_proj") or name.endswith("lm_head"))]
    if bad:
        raise H1tuneError(f"quantized modules that must stay whole: {', '.join(bad[:4])}"
                          f"{' ...' if len(bad) > 4 else ''}; the fused Mamba kernel reads out_proj.weight raw "
                          "(a packed 4-bit tensor there is garbage) and lm_head is kept whole for its μP "
                          "multiplier. Keep out_proj and lm_head in model.llm_int8_skip_modules")


def checkpoint_quantization_problems(hf_config: Any) -> list[str]:
    """Refuse a pre-quantized bitsandbytes checkpoint whose skip list lets out_proj or lm_head be quantized."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return []
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "bitsandbytes":
        return []
    skip = qc.get("llm_int8_skip_modules") or []
    missing = [m for m in ALWAYS_UNQUANTIZED if m not in skip]
    if missing:
        return [f"model.name_or_path: the checkpoint is bitsandbytes-quantized without {missing} in its "
                "llm_int8_skip_modules, so mamba.out_proj (read raw by the fused kernel) may be quantized; "
                "load the unquantized checkpoint and set model.quantization instead"]
    return []
