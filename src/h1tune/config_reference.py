"""The config reference, generated from the schema so it never drifts from it.

    h1tune init-config my.yaml --objective dpo      # every key, its default and what it does
    python -m h1tune.config_reference > docs/config-reference.md

A key's comment is its `description` in config.py plus the choices of a Literal type.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

from h1tune.config import H1tuneConfig, config_from_dict

_EXAMPLE_DATA = {"dpo": "pairs.jsonl", "kto": "labelled.jsonl", "grpo": "prompts.jsonl"}

# What the schema's field descriptions leave unsaid (keys that reuse Hugging Face / PEFT names).
NOTES = {
    "model.trust_remote_code": "run Python code shipped with a hub checkpoint (off: Falcon-H1 is in transformers)",
    "model.use_safetensors": "refuse pickled weights, which can run code when loaded",
    "model.revision": "hub branch, tag or commit",
    "data.train": "files (json, jsonl, parquet, csv) or hub ids; `path` or {path, format, weight, split}",
    "data.eval": "held-out sources, same forms as data.train",
    "data.max_length": "tokens per example (and per packed row)",
    "data.packing": "exact packing: attention and the Mamba state restart at every document",
    "data.system_prompt": "added as the system turn of conversations that have none",
    "data.assistant_only_loss": "loss on assistant turns only (completions for preference data)",
    "adapter.r": "LoRA rank",
    "adapter.lora_alpha": "LoRA scale numerator (scale = alpha / r, or alpha / sqrt(r) with use_rslora)",
    "adapter.lora_dropout": "dropout on the LoRA input",
    "adapter.target_modules": "groups (attention, mamba = in_proj, mlp), all-linear, module names or a regex; "
                              "mamba.conv1d / out_proj and lm_head are refused",
    "adapter.exclude_modules": "module names or regexes removed from the targets",
    "adapter.use_rslora": "rank-stabilised LoRA scaling",
    "training.learning_rate": "peak learning rate; default from the recipe",
    "training.lr_scheduler_type": "transformers scheduler name or wsd_exponential; default from the recipe",
    "training.warmup_ratio": "fraction of steps warming up; default from the recipe",
    "training.weight_decay": "AdamW weight decay; default from the recipe",
    "training.adam_beta1": "AdamW beta1; default from the recipe",
    "training.adam_beta2": "AdamW beta2; default from the recipe",
    "training.num_train_epochs": "passes over the training data",
    "training.max_steps": "stop after this many optimiser steps (-1: use num_train_epochs; 0 is refused)",
    "training.per_device_train_batch_size": "examples (or packed rows) per step and device",
    "training.per_device_eval_batch_size": "examples (or packed rows) per eval batch",
    "training.gradient_accumulation_steps": "micro-batches per optimiser step",
    "training.max_grad_norm": "gradient clipping (0: off)",
    "training.logging_steps": "steps between metrics.jsonl lines",
    "training.eval_steps": "steps between evaluations (default: save_steps)",
    "training.save_steps": "steps between complete checkpoints",
    "training.save_total_limit": "complete checkpoints kept",
    "training.seed": "seed of data order, LoRA init and dropout",
}


def _choices(annotation: Any) -> list[str]:
    """The allowed values of a Literal (also inside `X | None`)."""
    if get_origin(annotation) is Literal:
        return [str(a) for a in get_args(annotation)]
    if get_origin(annotation) in (Union, types.UnionType):
        return [c for a in get_args(annotation) for c in _choices(a)]
    return []


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return "choice"
    text = str(annotation).replace("typing.", "")
    for cls in ("str", "int", "float", "bool"):
        text = text.replace(f"<class '{cls}'>", cls)
    return text.replace("h1tune.config.", "")


def _sections(objective: str) -> dict[str, Any]:
    """The defaults of every section, with the objective and an example data path filled in."""
    tree = H1tuneConfig().model_dump(mode="json")
    tree["data"]["train"] = [{"path": _EXAMPLE_DATA.get(objective, "train.jsonl"), "format": "auto", "weight": 1.0,
                              "split": "train"}]
    if "objective" in tree["training"]:
        tree["training"]["objective"] = objective
    if objective == "grpo":  # a config that validates: grpo needs a reward
        tree["training"]["rewards"] = [{"name": "math_answer", "function": None, "weight": 1.0, "target": None}]
    return tree


def _comment(field, where: str = "") -> str:
    parts = [field.description or NOTES.get(where, "")]
    parts = [p for p in parts if p]
    choices = _choices(field.annotation)
    if choices:
        parts.append("one of: " + ", ".join(choices))
    return "; ".join(parts)


def commented_yaml(objective: str = "sft") -> str:
    """A complete config with every key at its default and a comment saying what it does."""
    tree = _sections(objective)
    lines = [f"# h1tune config (objective: {objective}): every key with its default. Relative paths are",
             "# relative to this file. Validate with `h1tune check THIS.yaml`; override with --set a.b=value.", ""]
    for name, field in H1tuneConfig.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            lines.append(f"{name}:" + (f"  # {section.__doc__.strip().splitlines()[0]}" if section.__doc__ else ""))
            for key, sub in section.model_fields.items():
                value = yaml.safe_dump({key: tree[name][key]}, default_flow_style=True, width=1000).strip()[1:-1]
                comment = _comment(sub, f"{name}.{key}")
                lines.append(f"  {value}" + (f"  # {comment}" if comment else ""))
        else:
            lines.append(yaml.safe_dump({name: tree[name]}).strip() + "  # where the run writes (relative: to this file)")
    text = "\n".join(lines) + "\n"
    config_from_dict(yaml.safe_load(text))  # what we write must load (raises ConfigError otherwise)
    return text


def reference_table() -> str:
    """Markdown: one table per section, a row per key with its type, default and description."""
    out = ["# h1tune config reference", "",
           "Generated from `src/h1tune/config.py` by `python -m h1tune.config_reference`; "
           "`h1tune init-config` writes the same keys as a commented YAML.", ""]
    defaults = H1tuneConfig().model_dump(mode="json")
    for name, field in H1tuneConfig.model_fields.items():
        section = field.annotation
        if not (isinstance(section, type) and issubclass(section, BaseModel)):
            out += [f"## `{name}`", "", f"Default `{defaults[name]}`. {field.description or ''}".strip(), ""]
            continue
        out += [f"## `{name}`", "", (section.__doc__ or "").strip().splitlines()[0], "",
                "| key | type | default | description |", "|---|---|---|---|"]
        for key, sub in section.model_fields.items():
            default = defaults[name][key]
            cells = [f"`{key}`", _type_name(sub.annotation), f"`{default!r}`", _comment(sub, f"{name}.{key}")]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(reference_table())
