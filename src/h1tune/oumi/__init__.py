"""Run OUMI's training configs (e.g. its Falcon-H1 recipes) unchanged, with h1tune's guarantees.

    h1tune train oumi_recipe.yaml --set model.name_or_path=tiny --set data.train=local.jsonl
    h1tune convert-config oumi_recipe.yaml -o h1tune.yaml

An OUMI training config (top-level model, data, training, peft, fsdp) is mapped onto an h1tune
config and validated by h1tune's schema; OUMI's defaults are mapped where they differ from
h1tune's, so the file runs OUMI's job. Before anything runs, the report lists every field that
was mapped, changed by h1tune's guarantees, not honoured, or ignored, each with its reason.
`--set` overrides use h1tune's field names and apply after the mapping. OUMI evaluation and
inference configs are recognised and refused with the equivalent h1tune command.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from h1tune.atomic import write_text_atomic
from h1tune.config import H1tuneConfig, load_config
from h1tune.errors import H1tuneError
from h1tune.oumi.convert import convert_file, map_oumi, read_yaml, to_yaml, validate
from h1tune.oumi.report import MappingReport
from h1tune.oumi.schema import config_kind

__all__ = ["MappingReport", "config_kind", "convert_config", "convert_file", "is_oumi_file", "load_run_config",
           "map_oumi", "to_yaml", "validate"]


def is_oumi_file(path: str | Path | None) -> bool:
    """True when `path` is a YAML file in one of OUMI's config schemas (training, evaluation, inference)."""
    return path is not None and Path(path).is_file() and config_kind(read_yaml(path)) is not None


def load_run_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), show=print) -> H1tuneConfig:
    """`h1tune train` / `check`: an h1tune config as usual, or an OUMI one mapped (its report shown first)."""
    if not is_oumi_file(path):
        return load_config(path, overrides)
    main_process = os.environ.get("RANK", "0") == "0"  # under --nproc every process maps; one reports
    cfg, _ = convert_file(path, overrides, show=show if main_process else None)
    return cfg


def convert_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), output: str | Path | None = None,
                   overwrite: bool = False) -> str:
    """`h1tune convert-config`: the report on stderr, the h1tune YAML on stdout or written atomically."""
    out = Path(output) if output else None
    if out is not None and out.exists() and not overwrite:
        raise H1tuneError(f"{out} exists; pass --overwrite to replace it, or choose another -o path")
    cfg, report = convert_file(path, overrides, show=lambda text: print(text, file=sys.stderr))
    text = to_yaml(cfg, report, folder=out.parent if out is not None else None)
    if out is None:
        sys.stdout.write(text)
    else:
        write_text_atomic(out, text)
        print(f"wrote {out}", file=sys.stderr)
    return text
