"""Turn an OUMI training config into an h1tune config, with the report of what became of each field.

    tree, report = map_oumi(yaml.safe_load(text), "qlora_dpo.yaml")   # h1tune dict + report, no validation
    cfg = validate(tree, report, ["model.name_or_path=tiny"])          # --set on top, then h1tune's schema
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from h1tune.config import H1tuneConfig, apply_overrides, config_from_dict
from h1tune.errors import ConfigError, H1tuneError
from h1tune.oumi.mapper import Section
from h1tune.oumi.model_data import dtype_name, map_data, map_model
from h1tune.oumi.other_configs import not_training_error
from h1tune.oumi.distributed import map_deepspeed, map_fsdp
from h1tune.oumi.lora import map_peft
from h1tune.oumi.report import MappingReport
from h1tune.oumi.schema import config_kind, schema_problems
from h1tune.oumi.training import map_training, objective_of

DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".txt")


def read_yaml(path: str | Path) -> Any:
    """The parsed file, or None when it cannot be read as YAML (load_config then reports why)."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def map_oumi(tree: dict[str, Any], source: str) -> tuple[dict[str, Any], MappingReport, list[Section]]:
    """The h1tune config dict for an OUMI training config, the report, and the sections consulted.

    Raises H1tuneError for OUMI evaluation/inference configs, ConfigError for unknown OUMI fields.
    """
    kind = config_kind(tree)
    if kind is None:
        raise H1tuneError(f"{source}: not an OUMI config (no model.model_name, data.train.datasets, peft or fsdp "
                          "section); an h1tune config is used as it is")
    if kind != "training":
        raise not_training_error(kind, tree, source)
    problems = schema_problems(tree)
    if problems:
        raise ConfigError([f"{source}: {p}" for p in problems])
    training = tree.get("training") or {}
    objective = objective_of(training.get("trainer_type"))
    report = MappingReport(source, str(training.get("trainer_type", "HF (OUMI default)")))
    out: dict[str, Any] = {}
    model = Section(tree.get("model"), "model.", out, report)
    map_model(model)
    data_values = tree.get("data") or {}
    data = Section(data_values, "data.", out, report)
    splits = {name: Section(data_values.get(name), f"data.{name}.", out, report)
              for name in ("train", "validation", "test")}
    map_data(data, splits, objective)
    train = Section(training, "training.", out, report)
    has_eval = bool((data_values.get("validation") or {}).get("datasets"))
    map_training(train, objective, has_eval)
    peft = Section(tree.get("peft"), "peft.", out, report)
    dtype = dtype_name((tree.get("model") or {}).get("torch_dtype_str", "auto"))
    map_peft(peft, bool(training.get("use_peft", False)), dtype, bool((tree.get("fsdp") or {}).get("enable_fsdp")))
    fsdp = Section(tree.get("fsdp"), "fsdp.", out, report)
    deepspeed = Section(tree.get("deepspeed"), "deepspeed.", out, report)
    map_fsdp(fsdp)
    map_deepspeed(deepspeed)
    sections = [model, data, *splits.values(), train, peft, fsdp, deepspeed]
    return out, report, sections + [c for s in sections for c in s.children]


def validate(tree: dict[str, Any], report: MappingReport, overrides: list[str] | tuple[str, ...] = ()) -> H1tuneConfig:
    """Apply `--set` (h1tune field names) to the mapped config and validate it with h1tune's schema.

    Each problem names the OUMI field it came from, unless an override set it.
    """
    report.overrides = list(overrides)
    problems = apply_overrides(tree, list(overrides))
    try:
        return config_from_dict(tree, problems)
    except ConfigError as exc:
        overridden = {item.partition("=")[0].strip() for item in overrides}
        raise ConfigError([_with_origin(p, report, overridden) for p in exc.problems]) from None


def _with_origin(problem: str, report: MappingReport, overridden: set[str]) -> str:
    path = problem.split(":", 1)[0]
    origin = report.origin(path)
    if origin is None or any(path == o or path.startswith(o + ".") for o in overridden):
        return problem
    return f"{problem} (from OUMI {origin}; fix it there or override it with --set {path}=...)"


def convert_file(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                 show=None) -> tuple[H1tuneConfig, MappingReport]:
    """Read, map and validate an OUMI training config file; `show` gets the report before validation."""
    tree = read_yaml(path)
    if not isinstance(tree, dict):
        raise H1tuneError(f"{path}: not a YAML mapping, so not an OUMI config")
    mapped, report, _ = map_oumi(tree, str(path))
    report.overrides = list(overrides)
    if show is not None:
        show(report.format())
    return validate(mapped, report, overrides), report


def to_yaml(cfg: H1tuneConfig, report: MappingReport, folder: str | Path | None = None) -> str:
    """The converted config as h1tune YAML, the mapping report above it as comments.

    OUMI reads relative paths from the current directory, h1tune's YAML from the file's folder:
    for a file written to `folder`, local relative paths are rewritten relative to it.
    """
    header = (f"# h1tune config converted from OUMI {report.source} (h1tune convert-config).\n"
              "# Review the NOT honoured fields; `h1tune train` on this file runs without the OUMI mapping.\n#\n")
    tree = cfg.model_dump(mode="json")
    if folder is not None:
        _rebase(tree, Path(folder))
    return header + report.as_comments() + "\n" + yaml.safe_dump(tree, sort_keys=False)


def _rebase(tree: dict[str, Any], folder: Path) -> None:
    """Relative paths of the current directory, made relative to `folder` (output_dir always, the
    data files and model directories when they exist here)."""
    def rebased(path: str, always: bool) -> str:
        if Path(path).is_absolute() or not (always or Path(path).exists()):
            return path
        return os.path.relpath(Path.cwd() / path, folder.resolve())

    tree["output_dir"] = rebased(tree["output_dir"], always=True)
    for key in ("name_or_path", "adapter"):
        if tree["model"].get(key):
            tree["model"][key] = rebased(tree["model"][key], always=False)
    for split in ("train", "eval"):
        for source in tree["data"][split]:  # a data-file name is a path even before the file exists
            source["path"] = rebased(source["path"], always=Path(source["path"]).suffix in DATA_SUFFIXES)
