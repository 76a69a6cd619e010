"""A saved LoRA adapter on disk: read it, find its base and its run, pick its tokenizer.

    cfg = read_adapter_config(Path("runs/sft/final"))       # refuses pickles and non-LoRA adapters
    base = adapter_base(Path("runs/sft/final"))               # base_model_name_or_path
    run = run_model_config(Path("runs/sft/final"))            # the run's model section (QLoRA?) or None

Used by merge, generate and eval, so an adapter directory means the same thing to each. Adapters
with LoRA weights on modules the fused Mamba kernel bypasses are found here (never trained).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from h1tune.errors import H1tuneError
from h1tune.policy import BYPASSED_MODULES, bypassed_reason

log = logging.getLogger("h1tune")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RUN_CONFIG = "config.yaml"  # h1tune's resolved run config, saved beside the adapter (or one level up)


RUN_FINAL_DIR = "final"  # a run directory's adapter (h1tune.train.run_dir.FINAL_DIR)


def find_adapter_dir(path: str | Path) -> Path | None:
    """The adapter directory `path` means: itself, or a run directory's final/ (so a run directory is
    accepted wherever an adapter directory is); None when it holds no adapter."""
    path = Path(path)
    for candidate in (path, path / RUN_FINAL_DIR):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    return None


def is_adapter_dir(path: str | Path) -> bool:
    """Does `path` hold a peft adapter, or is it a run directory whose final/ does?"""
    return find_adapter_dir(path) is not None


def record_base(adapter_dir: Path, base: str) -> None:
    """Write a base name that resolves on another machine (a preset name, a hub id, or the absolute
    local directory) into adapter_config.json; peft records the path it loaded from, which for an
    h1tune preset is a private cache directory."""
    from h1tune.atomic import write_text_atomic

    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    if config.get("base_model_name_or_path") != base:
        log.info("adapter records its base as %r", base)
        config["base_model_name_or_path"] = base
        write_text_atomic(adapter_dir / ADAPTER_CONFIG, json.dumps(config, indent=2))


def adapter_base(adapter_dir: str | Path) -> str:
    """The base model an adapter was trained on, from its adapter_config.json."""
    adapter_dir = find_adapter_dir(adapter_dir) or Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    if not config.get("base_model_name_or_path"):
        raise H1tuneError(f"adapter: {Path(adapter_dir) / ADAPTER_CONFIG} names no base_model_name_or_path; pass "
                          "the base model explicitly (--base, or the model and --adapter separately)")
    return config["base_model_name_or_path"]


def tokenizer_source(adapter_dir: str | Path | None, base_path: str) -> str:
    """The adapter's own tokenizer when its run saved one (its chat template is what trained), else the base's."""
    if adapter_dir is not None and (Path(adapter_dir) / "tokenizer_config.json").is_file():
        return str(adapter_dir)
    return base_path


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """adapter_config.json of a peft LoRA adapter saved as safetensors; errors say what is missing."""
    adapter_dir = find_adapter_dir(adapter_dir) or Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise H1tuneError(f"adapter: {str(adapter_dir)!r} is not a directory; give the folder that holds "
                          f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    cfg_path = adapter_dir / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise H1tuneError(f"adapter: {adapter_dir} has no {ADAPTER_CONFIG}; is it a merged model or a run "
                          "directory? Give the folder written by save_pretrained of a peft adapter")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        pickled = (adapter_dir / "adapter_model.bin").is_file()
        raise H1tuneError(f"adapter: {adapter_dir} has no {ADAPTER_WEIGHTS}"
                          + ("; it has a pickled adapter_model.bin, which can run code when loaded: re-save it "
                             "with safetensors (peft save_pretrained(..., safe_serialization=True))" if pickled else ""))
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise H1tuneError(f"adapter: {cfg_path} is not valid JSON ({exc})") from None
    if config.get("peft_type") != "LORA":
        raise H1tuneError(f"adapter: {cfg_path} has peft_type {config.get('peft_type')!r}; h1tune merges LoRA "
                          "adapters (peft_type LORA) only")
    return config


def adapter_module_paths(adapter_dir: Path) -> dict[str, list[str]]:
    """Module path (relative to the model, e.g. model.layers.0.mamba.in_proj) -> its LoRA tensor keys."""
    from safetensors import safe_open

    modules: dict[str, list[str]] = {}
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as f:
        for key in f.keys():
            parts = key.split(".")
            cut = next((i for i, p in enumerate(parts) if p.startswith("lora_")), None)
            if cut is None:
                continue  # modules_to_save: full tensors, not LoRA factors
            path = ".".join(parts[:cut]).removeprefix("base_model.model.")
            modules.setdefault(path, []).append(key)
    return modules


def bypassed_in_adapter(adapter_dir: Path) -> dict[str, list[str]]:
    """LoRA'd modules of the adapter that the fused Mamba kernel bypasses, grouped by leaf name."""
    found: dict[str, list[str]] = {}
    for path in adapter_module_paths(adapter_dir):
        if bypassed_reason(path):
            found.setdefault(path.rsplit(".", 1)[-1], []).append(path)
    return {leaf: sorted(paths, key=_natural) for leaf, paths in sorted(found.items())}


def refuse_bypassed(adapter_dir: Path, found: dict[str, list[str]]) -> None:
    if not found:
        return
    lines = [f"adapter: {adapter_dir} has LoRA weights on modules that must not carry one:"]
    for leaf, paths in found.items():
        lines.append(f"  - mamba.{leaf} ({len(paths)} modules, e.g. {paths[0]}): {BYPASSED_MODULES[leaf]}")
    lines.append("Pass drop_bypassed=True (--drop-bypassed) to merge the rest without them, or retrain with "
                 "the default targets (attention, mamba in_proj, mlp)")
    raise H1tuneError("\n".join(lines))


def write_filtered_adapter(adapter_dir: Path, drop: dict[str, list[str]], dest: Path) -> Path:
    """Copy the adapter to `dest` without the LoRA weights of the `drop` modules.

    target_modules becomes a regex that matches exactly the modules still carrying weights, so peft
    neither wraps the dropped modules (its Mamba guard would refuse them) nor any module it has no
    weights for.
    """
    from safetensors.torch import load_file, save_file

    dropped = {p for paths in drop.values() for p in paths}
    modules = adapter_module_paths(adapter_dir)
    keep_keys = {k for path, keys in modules.items() if path not in dropped for k in keys}
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    kept = {k: v for k, v in tensors.items() if k in keep_keys or not any(p.startswith("lora_") for p in k.split("."))}
    if not any(k in keep_keys for k in kept):
        raise H1tuneError(f"adapter: {adapter_dir} has LoRA weights only on bypassed modules; nothing is left to merge")
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    remaining = sorted((p for p in modules if p not in dropped), key=_natural)
    config["target_modules"] = "(" + "|".join(re.escape(p) for p in remaining) + ")"
    config["layers_to_transform"] = None
    config["layers_pattern"] = None
    dest.mkdir(parents=True, exist_ok=True)
    save_file(kept, str(dest / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (dest / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return dest


def run_model_config(adapter_dir: Path):
    """The `model:` section of h1tune's config.yaml saved with the run (adapter dir or its parent), or None."""
    import yaml

    from h1tune.config import ModelConfig

    for path in (adapter_dir / RUN_CONFIG, adapter_dir.parent / RUN_CONFIG):
        if not path.is_file():
            continue
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            continue
        if isinstance(tree, dict) and isinstance(tree.get("model"), dict):
            try:
                return ModelConfig.model_validate(tree["model"])
            except Exception as exc:  # pydantic ValidationError; a foreign config.yaml is not ours to judge
                log.warning("ignoring %s: its model section is not an h1tune ModelConfig (%s)", path, exc)
    return None


def _natural(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]
