"""Adapter policy for Falcon-H1: which modules LoRA may target, and why some never.

    model = apply_adapter(load_model(cfg.model), cfg)   # LoRA / QLoRA / full, logs a table
    report = probe_adapters(model, batch)                # h1tune.probe: every adapter must move the loss

The policy is data (TARGET_GROUPS, BYPASSED_MODULES, FREEZE_GROUPS); the functions below apply
it twice: to the spelling in the config (`target_spelling_problems`, before any weights load) and
to the real module names of the loaded model (`resolve_targets`). peft only ever receives an
explicit list of module names: its `all-linear` reaches mamba.out_proj and is refused by its own
Mamba guard on Falcon-H1. The top level imports no torch, because config validation calls in here.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from h1tune.errors import ConfigError, H1tuneError

if TYPE_CHECKING:
    from h1tune.config import AdapterConfig, H1tuneConfig

log = logging.getLogger("h1tune")

# Target groups by name; each is a regex over module paths relative to the model.
TARGET_GROUPS: dict[str, str] = {
    "attention": r"self_attn\.(q|k|v|o)_proj",
    "mamba": r"mamba\.in_proj",  # in_proj is called as a module on every path; see BYPASSED_MODULES
    "mlp": r"feed_forward\.(gate|up|down)_proj",
}
ALL_LINEAR = "all-linear"  # resolves to the union of TARGET_GROUPS, never peft's all-linear

# Mamba weights that the fused kernel reads raw (`self.conv1d.weight`, `self.out_proj.weight`),
# so a LoRA wrapper around them never runs in training.
BYPASSED_MODULES = {
    "conv1d": "the fused Mamba kernel reads mamba.conv1d.weight raw, so a LoRA there never trains; it is also a "
    "depthwise conv (weight (channels, 1, kernel), no channel mixing) and peft's merge of it crashes "
    "(Falcon-H1 issue #13)",
    "out_proj": "the fused Mamba kernel reads mamba.out_proj.weight raw (kernel bypass), so a LoRA there never "
    "trains under the kernels and makes training and inference disagree",
}
# Always kept in full precision under bitsandbytes: the fused Mamba kernel reads out_proj.weight raw
# (a packed 4-bit tensor would be garbage there), and passing any skip list to transformers
# *replaces* its default list, which is what kept lm_head unquantized.
ALWAYS_UNQUANTIZED = ("out_proj", "lm_head")
SAFE_ALTERNATIVE = "remove it (default targets: attention, mamba in_proj, mlp; `all-linear` gives the same safe set)"

# Spellings people try for "everything"; none is ours, each gets a pointer to the safe one.
_ALL_LOOKALIKES = {"all", "all_linear", "alllinear", "all-linears", "*", "**", "linear", "all-modules"}

# Module paths of a representative model, for checking a spelling before any model is loaded.
# Several layer indices, so `layers\.7\.mamba\.out_proj`-style regexes are caught too.
_LAYER_PARTS = [
    "", ".self_attn", ".mamba", ".feed_forward", ".input_layernorm", ".pre_ff_layernorm",
    *(f".self_attn.{p}_proj" for p in "qkvo"),
    *(f".mamba.{n}" for n in ("in_proj", "conv1d", "out_proj", "norm", "act")),
    *(f".feed_forward.{p}_proj" for p in ("gate", "up", "down")),
    ".feed_forward.act_fn",
]
_EXAMPLE_PATHS = [
    "model", "model.embed_tokens", "model.layers", "model.final_layernorm", "model.rotary_emb", "lm_head",
    *(f"model.layers.{i}{part}" for i in range(128) for part in _LAYER_PARTS),
]
_LINEAR_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj", "gate_proj", "up_proj", "down_proj",
                  "lm_head"}

# Full fine-tuning: groups of parameters a user may keep frozen (regex searched in parameter names).
# `mamba` here is the whole mixer (in_proj, conv1d, out_proj, A_log, D, dt_bias), unlike the LoRA group.
FREEZE_GROUPS: dict[str, str] = {
    "embeddings": r"(^|\.)embed_tokens\.",
    "lm_head": r"(^|\.)lm_head\.",
    "norms": r"(layernorm|\.norm)\.",
    "attention": r"\.self_attn\.",
    "mamba": r"\.mamba\.",
    "mamba_ssm": r"\.mamba\.(A_log|D|dt_bias|conv1d\.)",
    "mlp": r"\.feed_forward\.",
}

_REGEX_CHARS = set("*+?[]()|^$\\{}")


def is_regex(spec: str) -> bool:
    """A target spec with regex syntax is matched in full against module paths (peft's convention)."""
    return any(ch in _REGEX_CHARS for ch in spec)


def spec_matches(spec: str, path: str) -> bool:
    """Does one target spec (group, `all-linear`, module name, dotted suffix or regex) select `path`?"""
    if spec in TARGET_GROUPS:
        return re.search(rf"(^|\.){TARGET_GROUPS[spec]}$", path) is not None
    if spec == ALL_LINEAR:
        return any(spec_matches(group, path) for group in TARGET_GROUPS)
    if is_regex(spec):
        try:
            return re.fullmatch(spec, path) is not None
        except re.error:
            return False
    return path == spec or path.endswith("." + spec)


def bypassed_reason(path: str) -> str | None:
    """Why LoRA must not sit at module `path`, or None when it may."""
    leaf = path.rsplit(".", 1)[-1]
    if leaf in BYPASSED_MODULES and ("mamba" in path.split(".") or "." not in path):
        return BYPASSED_MODULES[leaf]
    return None


def target_group(path: str) -> str:
    """The target group of a module path: attention, mamba, mlp; `bypassed` or `other` otherwise."""
    for group in TARGET_GROUPS:
        if spec_matches(group, path):
            return group
    return "bypassed" if bypassed_reason(path) else "other"


def _selected(specs: list[str], exclude: list[str], paths: list[str]) -> dict[str, list[str]]:
    """For each spec, the paths it selects that no exclude spec removes."""
    kept = [p for p in paths if not any(spec_matches(e, p) for e in exclude)]
    return {spec: [p for p in kept if spec_matches(spec, p)] for spec in specs}


def _spec_shape_problems(spec: str) -> list[str]:
    """Spellings that are wrong whatever the model: lookalikes of all-linear, bad regexes, parameter names."""
    if not isinstance(spec, str) or not spec.strip():
        return [f"{spec!r} is not a module name, group or regex"]
    if spec.lower() in _ALL_LOOKALIKES or (spec.lower() == ALL_LINEAR and spec != ALL_LINEAR):
        return [f"{spec!r} is not a target spelling; use {ALL_LINEAR!r} (attention, mamba in_proj and "
                "mlp; never mamba.out_proj, conv1d or lm_head) or the default groups"]
    if is_regex(spec):
        try:
            re.compile(spec)
        except re.error as exc:
            return [f"{spec!r} is not a valid regex ({exc}); module names and groups need no regex"]
    if spec.endswith((".weight", ".bias")):
        return [f"{spec!r} names a parameter; give the module ({spec.rsplit('.', 1)[0]!r})"]
    return []


def target_spelling_problems(specs: list[str], exclude: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Refuse, before loading weights, every spec that would reach conv1d, mamba.out_proj or lm_head.

    Problems are returned without the `adapter.target_modules:` prefix (config.py adds it).
    `exclude` is adapter.exclude_modules: a spec whose reach into a bypassed module is excluded passes.
    """
    problems: list[str] = []
    if not specs:
        return [f"is empty; {SAFE_ALTERNATIVE}"]
    for spec in exclude:
        problems += [f"(in adapter.exclude_modules) {p}" for p in _spec_shape_problems(spec)]
    if problems:
        return problems
    for spec in specs:
        shape = _spec_shape_problems(spec)
        if shape:
            problems += shape
            continue
        hits = _selected([spec], list(exclude), _EXAMPLE_PATHS)[spec]
        leaves = sorted({p.rsplit(".", 1)[-1] for p in hits if bypassed_reason(p)})
        for leaf in leaves:
            problems.append(f"{spec!r} reaches mamba.{leaf}: {BYPASSED_MODULES[leaf]}; {SAFE_ALTERNATIVE}")
        if any(p == "lm_head" for p in hits):
            problems.append(f"{spec!r} reaches lm_head, which h1tune does not adapt (it is kept unquantized and its "
                            "μP multiplier scales any delta); remove it")
        blocks = [p for p in hits if p.rsplit(".", 1)[-1] not in _LINEAR_LEAVES]
        if blocks and not leaves:
            problems.append(f"{spec!r} selects {blocks[0]!r}, which is not a Linear layer; LoRA wraps Linear layers: "
                            "use a group (attention, mamba, mlp) or names like q_proj, in_proj, down_proj")
        # Layer-specific plain names (model.layers.200.x) may exceed the example model: only the real model knows.
        if not hits and not is_regex(spec) and not re.search(r"layers\.\d+", spec):
            problems.append(f"{spec!r} matches no Falcon-H1 module; use a group (attention, mamba, mlp), "
                            f"{ALL_LINEAR!r}, or a module name such as q_proj, in_proj, gate_proj")
    return problems


def resolve_targets(model: Any, adapter_cfg: "AdapterConfig") -> list[str]:
    """The full module names LoRA will wrap in `model`, after `exclude_modules`; refuses unsafe ones.

    Raises:
        ConfigError: a spec matching nothing, or any selected module that is conv1d, mamba.out_proj,
            lm_head or not a Linear layer; every problem at once.
    """
    import torch

    named = dict(model.named_modules())
    paths = [name for name in named if name]
    specs, exclude = list(adapter_cfg.target_modules), list(adapter_cfg.exclude_modules)
    problems = [f"adapter.target_modules: {p}" for p in target_spelling_problems(specs, exclude)
                if "matches no Falcon-H1 module" not in p]
    if problems:
        raise ConfigError(problems)
    selected = _selected(specs, exclude, paths)
    for spec, hits in selected.items():
        if not hits:
            problems.append(f"adapter.target_modules: {spec!r} matches no module of this model (after "
                            f"adapter.exclude_modules); module names look like {_example_linear(paths)!r}")
    for spec in exclude:
        if not any(spec_matches(spec, p) for p in paths):
            log.warning("adapter.exclude_modules: %r matches no module of this model", spec)
    chosen = [p for p in paths if any(p in hits for hits in selected.values())]
    for path in chosen:
        reason = bypassed_reason(path)
        if reason:
            problems.append(f"adapter.target_modules: selects {path!r}: {reason}; {SAFE_ALTERNATIVE}")
        elif path.rsplit(".", 1)[-1] == "lm_head":
            problems.append(f"adapter.target_modules: selects {path!r}; h1tune does not adapt lm_head; remove it")
        elif not isinstance(named[path], torch.nn.Linear):
            problems.append(f"adapter.target_modules: selects {path!r}, a {type(named[path]).__name__}, not a "
                            "Linear layer; use a group (attention, mamba, mlp) or Linear names (q_proj, in_proj)")
    if not chosen and not problems:
        problems.append(f"adapter.target_modules: {specs} selects no module; {SAFE_ALTERNATIVE}")
    if problems:
        raise ConfigError(problems)
    return chosen


def _example_linear(paths: list[str]) -> str:
    return next((p for p in paths if p.endswith("q_proj")), paths[-1] if paths else "")


def lora_config(adapter_cfg: "AdapterConfig", module_names: list[str]):
    """A peft LoraConfig over an explicit list of full module names (never `all-linear`)."""
    from peft import LoraConfig

    return LoraConfig(
        r=adapter_cfg.r,
        lora_alpha=adapter_cfg.lora_alpha,
        lora_dropout=adapter_cfg.lora_dropout,
        use_rslora=adapter_cfg.use_rslora,
        target_modules=list(module_names),
        bias="none",
        task_type="CAUSAL_LM",
    )


def prepare_kbit(model: Any) -> Any:
    """peft's k-bit preparation: base frozen, non-reentrant gradient checkpointing, input grads on."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    # Non-reentrant checkpointing does not need it; a trainer that switches to reentrant would.
    model.enable_input_require_grads()
    return model


def freeze_for_full(model: Any, freeze: list[str]) -> list[str]:
    """Full fine-tuning: train every parameter except the FREEZE_GROUPS named; return the frozen names.

    Buffers (the μP `mup_vector`) are never touched: they are not parameters.
    """
    problems = [f"adapter.freeze: unknown group {g!r}; choose from {sorted(FREEZE_GROUPS)}"
                for g in freeze if g not in FREEZE_GROUPS]
    if problems:
        raise ConfigError(problems)
    frozen = []
    for name, param in model.named_parameters():
        hit = any(re.search(FREEZE_GROUPS[g], name) for g in freeze)
        param.requires_grad_(not hit)
        if hit:
            frozen.append(name)
    for group in freeze:
        if not any(re.search(FREEZE_GROUPS[group], n) for n in frozen):
            raise ConfigError(f"adapter.freeze: {group!r} matches no parameter of this model; remove it")
    if len(frozen) == sum(1 for _ in model.parameters()):
        raise ConfigError(f"adapter.freeze: {freeze} freezes every parameter; nothing would train")
    return frozen


def _is_quantized(model: Any) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def apply_adapter(model: Any, cfg: "H1tuneConfig") -> Any:
    """Make `model` trainable per `cfg.adapter`: peft LoRA (k-bit prepared when quantized) or full FT.

    Returns the model to train (a PeftModel for LoRA) and logs the per-group table.
    """
    adapter = cfg.adapter
    if adapter.method == "full":
        if _is_quantized(model):
            raise ConfigError("adapter.method: 'full' cannot train quantized base weights; "
                              "set model.quantization: none")
        frozen = freeze_for_full(model, adapter.freeze)
        log.info("full fine-tuning, %d parameter tensors frozen (%s)\n%s", len(frozen),
                 ", ".join(adapter.freeze) or "none", summarize_trainable(model))
        return model
    from peft import get_peft_model

    names = resolve_targets(model, adapter)
    if _is_quantized(model):
        model = prepare_kbit(model)
    peft_model = get_peft_model(model, lora_config(adapter, names))
    wrapped = set(getattr(peft_model, "targeted_module_names", names))
    missing = [n for n in names if n not in wrapped and f"base_model.model.{n}" not in wrapped]
    if missing:
        raise H1tuneError(f"peft did not wrap {missing[:4]} although h1tune resolved them; report this with "
                          "your peft version")
    log.info("LoRA r=%d alpha=%g on %d modules\n%s", adapter.r, adapter.lora_alpha, len(names),
             summarize_trainable(peft_model))
    return peft_model


def _strip_peft(name: str) -> str:
    return name.removeprefix("base_model.model.")


def summarize_trainable(model: Any) -> str:
    """A table of trainable parameters by group (LoRA: modules wrapped per target group)."""
    lora_modules: dict[str, set[str]] = {}
    rows: dict[str, list[int]] = {}  # group -> [trainable, total]
    total = trainable = 0
    for name, param in model.named_parameters():
        n = param.numel() * (2 if type(param).__name__ == "Params4bit" else 1)  # 4-bit packs two per byte
        total += n
        if ".lora_" in name:
            module = _strip_peft(name.split(".lora_")[0])
            group = target_group(module)
            lora_modules.setdefault(group, set()).add(module)
        else:
            group = next((g for g, pat in FREEZE_GROUPS.items() if g != "mamba_ssm" and re.search(pat, name)), "other")
        row = rows.setdefault(group, [0, 0])
        row[1] += n
        if param.requires_grad:
            row[0] += n
            trainable += n
    lines = [f"{'group':<12} {'modules':>8} {'trainable':>14} {'of params':>14}"]
    for group, (t, n) in rows.items():
        count = len(lora_modules.get(group, ())) or "-"
        lines.append(f"{group:<12} {count!s:>8} {t:>14,} {n:>14,}")
    pct = 100.0 * trainable / max(total, 1)
    lines.append(f"{'total':<12} {sum(len(v) for v in lora_modules.values()) or '-'!s:>8} {trainable:>14,} "
                 f"{total:>14,}  ({pct:.2f}% trainable)")
    return "\n".join(lines)


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
