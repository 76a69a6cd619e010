"""Falcon-H1's adapter policy as data: what LoRA may target, what it never may, what stays whole.

    problems = target_spelling_problems(["attention", "out_proj"])   # before any weights load
    param_group("model.layers.3.mamba.in_proj.lora_A.default.weight")  # -> "mamba"

TARGET_GROUPS, BYPASSED_MODULES, ALWAYS_UNQUANTIZED and FREEZE_GROUPS are the policy; the
functions apply it to a spelling in a config (here, torch-free, so config validation can call
it) and to the real module names of a loaded model (h1tune.adapters.lora). peft only ever
receives an explicit list of module names: its `all-linear` reaches mamba.out_proj and is
refused by its own Mamba guard on Falcon-H1. Only this module, model.py, presets.py and ssm/
spell Falcon-H1 module names; everything else asks here.
"""

from __future__ import annotations

import re

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
# The unit FSDP wraps and shards (and transformers' _no_split_modules): one hybrid attention+Mamba+MLP
# layer. The shipped accelerate config fsdp.yaml names it; a test keeps the two equal.
DECODER_LAYER_CLASS = "FalconH1DecoderLayer"
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


# The order in which param_group tries FREEZE_GROUPS: mamba.norm is a norm, not the mixer.
_LABEL_ORDER = ("embeddings", "lm_head", "norms", "attention", "mamba", "mlp")
_PEFT_PARTS = re.compile(r"\.(lora_[A-Za-z_]+|base_layer)(\.|$).*$")


def never_adapted(path: str) -> bool:
    """lm_head is never a LoRA target: it is kept whole and its μP multiplier scales any delta."""
    return path.rsplit(".", 1)[-1] == "lm_head"


def param_group(name: str) -> str:
    """The group of a module or parameter name, for every table and the probe.

    One of embeddings, lm_head, norms, attention, mamba (the whole mixer: in_proj, conv1d,
    out_proj, A_log, D, dt_bias), mlp, or other. peft's prefixes and LoRA factors are stripped,
    so an adapter is labelled with the module it wraps.
    """
    path = _PEFT_PARTS.sub("", name.removeprefix("base_model.model.")) + "."
    for group in _LABEL_ORDER:
        if re.search(FREEZE_GROUPS[group], path):
            return group
    return "other"


def select_paths(specs: list[str], exclude: list[str], paths: list[str]) -> dict[str, list[str]]:
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
        hits = select_paths([spec], list(exclude), _EXAMPLE_PATHS)[spec]
        leaves = sorted({p.rsplit(".", 1)[-1] for p in hits if bypassed_reason(p)})
        for leaf in leaves:
            problems.append(f"{spec!r} reaches mamba.{leaf}: {BYPASSED_MODULES[leaf]}; {SAFE_ALTERNATIVE}")
        if any(never_adapted(p) for p in hits):
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


