"""Adapter policy for Falcon-H1: which modules LoRA may target, and why some never.

The policy is data (TARGET_GROUPS, BYPASSED_MODULES); functions below apply it. The top level
imports no torch, because config validation calls `target_spelling_problems`.
"""

from __future__ import annotations

import re

# Target groups by name; each is a regex over module paths relative to the model.
TARGET_GROUPS: dict[str, str] = {
    "attention": r"self_attn\.(q|k|v|o)_proj",
    "mamba": r"mamba\.in_proj",  # in_proj is called as a module on every path; see BYPASSED_MODULES
    "mlp": r"feed_forward\.(gate|up|down)_proj",
}
ALL_LINEAR = "all-linear"

# Mamba weights that the fused kernel reads raw (`self.conv1d.weight`, `self.out_proj.weight`),
# so a LoRA wrapper around them never runs in training.
BYPASSED_MODULES = {
    "conv1d": "the fused Mamba kernel reads mamba.conv1d.weight raw, so a LoRA there never trains; it is also a "
    "depthwise conv (weight (channels, 1, kernel), no channel mixing) and peft's merge of it crashes "
    "(Falcon-H1 issue #13)",
    "out_proj": "the fused Mamba kernel reads mamba.out_proj.weight raw, so a LoRA there never trains under the "
    "kernels and makes training and inference disagree",
}
SAFE_ALTERNATIVE = "remove it (default targets: attention, mamba in_proj, mlp; `all-linear` gives the same safe set)"

# Module paths of one representative layer, for checking a spelling before any model is loaded.
_EXAMPLE_PATHS = [
    "model.embed_tokens",
    "lm_head",
    *(f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"),
    *(f"model.layers.0.mamba.{n}" for n in ("in_proj", "conv1d", "out_proj")),
    *(f"model.layers.0.feed_forward.{p}_proj" for p in ("gate", "up", "down")),
]

# Full fine-tuning: groups of parameters a user may keep frozen (regex over parameter names).
FREEZE_GROUPS: dict[str, str] = {
    "embeddings": r"(^|\.)embed_tokens\.",
    "lm_head": r"(^|\.)lm_head\.",
    "norms": r"(layernorm|final_layernorm|\.norm)\.",
    **{group: pattern + r"\." for group, pattern in TARGET_GROUPS.items()},
    "mamba_ssm": r"mamba\.(A_log|D|dt_bias|conv1d\.)",
}

_REGEX_CHARS = set("*+?[]()|^$\\{}")


def is_regex(spec: str) -> bool:
    """A target spec with regex syntax is matched in full against module paths (peft's convention)."""
    return any(ch in _REGEX_CHARS for ch in spec)


def spec_matches(spec: str, path: str) -> bool:
    """Does one target spec (group, module name, dotted suffix or regex) select module `path`?"""
    if spec in TARGET_GROUPS:
        return re.search(rf"(^|\.){TARGET_GROUPS[spec]}$", path) is not None
    if spec == ALL_LINEAR:
        return any(spec_matches(group, path) for group in TARGET_GROUPS)
    if is_regex(spec):
        return re.fullmatch(spec, path) is not None
    return path == spec or path.endswith("." + spec)


def bypassed_reason(path: str) -> str | None:
    """Why LoRA must not sit at module `path`, or None when it may."""
    leaf = path.rsplit(".", 1)[-1]
    if leaf in BYPASSED_MODULES and ("mamba" in path.split(".") or "." not in path):
        return BYPASSED_MODULES[leaf]
    return None


def target_spelling_problems(specs: list[str]) -> list[str]:
    """Refuse, before loading weights, every spec that would reach conv1d or mamba.out_proj."""
    problems = []
    if not specs:
        problems.append(f"is empty; {SAFE_ALTERNATIVE}")
    for spec in specs:
        if is_regex(spec):
            try:
                re.compile(spec)
            except re.error as exc:
                problems.append(f"{spec!r} is not a valid regex ({exc})")
                continue
        hits = [p for p in _EXAMPLE_PATHS if spec_matches(spec, p) and bypassed_reason(p)]
        for path in hits:
            leaf = path.rsplit(".", 1)[-1]
            problems.append(f"{spec!r} reaches mamba.{leaf}: {bypassed_reason(path)}; {SAFE_ALTERNATIVE}")
        if spec_matches(spec, "lm_head") and spec not in TARGET_GROUPS:
            problems.append(f"{spec!r} reaches lm_head, which h1tune does not adapt; remove it")
    return problems


def verify_unquantized(model) -> None:
    """Fail loudly if bitsandbytes quantized a mamba.out_proj or the lm_head."""
    from h1tune.errors import H1tuneError

    bad = [name for name, module in model.named_modules()
           if type(module).__name__ in ("Linear4bit", "Linear8bitLt")
           and (name.endswith("mamba.out_proj") or name.endswith("lm_head"))]
    if bad:
        raise H1tuneError(f"quantized modules that must stay whole: {', '.join(bad[:4])}"
                          f"{' ...' if len(bad) > 4 else ''}; the fused Mamba kernel reads out_proj.weight raw. "
                          "Keep out_proj and lm_head in model.llm_int8_skip_modules")
