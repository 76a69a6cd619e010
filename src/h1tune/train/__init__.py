"""Training: the pre-flight both `train` and `check` run, the run, and one module per objective.

    from h1tune.train import run_training
    result = run_training(load_config("examples/quickstart.yaml"))

Modules: preflight.py (inputs, model, probe), run.py (the run, any objective), the objectives: sft.py
(H1Trainer, trainer.py), preference.py (DPO and KTO: one data path, TRL's two trainers in
preference_trainers.py), grpo.py; arguments.py and recipes.py (optimiser settings), run_dir.py (output
directory, resume), callbacks.py and plots.py. The loss and batches live below, in h1tune.lm.
Importing this package stays light: run_training is imported on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_training", "TrainResult"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from h1tune.train import run

        return getattr(run, name)
    raise AttributeError(f"module 'h1tune.train' has no attribute {name!r}")
