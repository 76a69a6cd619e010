"""What an `h1tune eval` MODEL argument names, and loading it the way it was trained.

    spec = resolve_model("runs/sft")            # a run directory: its final/ (here a LoRA adapter)
    model, tokenizer = load_eval_model(spec, cfg.model)

A MODEL is a run directory (its `final/`), an adapter directory (the base + the adapter; a QLoRA
adapter runs on the 4-bit base it was trained against, read from the run's config.yaml), or
anything `h1tune.model` loads: a model directory (merged or fully fine-tuned), a hub id or a
preset. Resolving touches no weights, so every argument is checked before the first model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from h1tune.config import ModelConfig
from h1tune.errors import H1tuneError

FINAL_DIR = "final"  # h1tune.train.run_dir.FINAL_DIR, repeated to keep this module torch-free
RUN_CONFIG = "config.yaml"


@dataclass(frozen=True)
class ModelSpec:
    """One model to evaluate: the name the user gave (the table's column) and what is loaded."""

    name: str
    path: str
    kind: Literal["adapter", "model"]
    base: str | None = None  # an adapter's base model

    def describe(self) -> str:
        return f"{self.path} (adapter on {self.base})" if self.kind == "adapter" else self.path


def resolve_model(arg: str) -> ModelSpec:
    """The model behind a MODEL argument; a run directory becomes its `final/`.

    Raises:
        H1tuneError: a directory that is neither a run, an adapter nor a model directory, or a
            run that never wrote `final/`.
    """
    from h1tune.adapters.checkpoint import ADAPTER_CONFIG, adapter_base

    def is_adapter_dir(folder: Path) -> bool:  # this folder itself, not a run directory's final/
        return (folder / ADAPTER_CONFIG).is_file()

    path = Path(arg).expanduser()
    if path.is_dir() and not is_adapter_dir(path) and not (path / "config.json").is_file():
        if (path / FINAL_DIR).is_dir():
            path = path / FINAL_DIR
        elif (path / RUN_CONFIG).is_file():
            raise H1tuneError(f"MODEL {arg!r}: a run directory without {FINAL_DIR}/ (the run has not finished); "
                              f"evaluate one of its checkpoint-N directories, or finish the run with `h1tune train`")
        else:
            raise H1tuneError(f"MODEL {arg!r}: this directory holds no model (config.json), adapter "
                              f"(adapter_config.json) or finished run ({FINAL_DIR}/); check the path")
    if is_adapter_dir(path):
        return ModelSpec(arg, str(path), "adapter", adapter_base(path))
    if not path.exists() and str(arg).startswith((".", "/", "~")):
        raise H1tuneError(f"MODEL {arg!r}: no such directory (cwd: {Path.cwd()})")
    return ModelSpec(arg, str(path) if path.exists() else arg, "model")


def run_config_path(spec: ModelSpec) -> Path | None:
    """The config.yaml a training run saved beside this model (in its final/ or the run directory)."""
    path = Path(spec.path)
    if not path.is_dir():
        return None
    return next((p for p in (path / RUN_CONFIG, path.parent / RUN_CONFIG) if p.is_file()), None)


def eval_model_config(spec: ModelSpec, model_cfg: ModelConfig) -> ModelConfig:
    """How to load `spec`: an adapter as its run loaded the base, a model per `model_cfg`.

    For an adapter, the run's own `model:` section (quantization, skip list, preset seed, attention)
    wins over the command's, because that is the model the adapter was trained against; only an
    explicit `model.dtype` from the command is kept.
    """
    if spec.kind == "model":
        return model_cfg.model_copy(update={"name_or_path": spec.path})
    from h1tune.adapters.checkpoint import run_model_config

    trained = run_model_config(Path(spec.path))
    chosen = trained if trained is not None else model_cfg
    dtype = model_cfg.dtype if model_cfg.dtype != "auto" else chosen.dtype
    return chosen.model_copy(update={"name_or_path": spec.path, "dtype": dtype})


def load_eval_model(spec: ModelSpec, model_cfg: ModelConfig):
    """(model in eval mode, tokenizer) for `spec`, through the same loader as `h1tune generate`."""
    from h1tune.generate import load_for_generation

    model, tokenizer = load_for_generation(eval_model_config(spec, model_cfg))
    model.eval()
    return model, tokenizer
