"""Training: the pre-flight both `train` and `check` run, the Trainer h1tune extends, SFT.

    from h1tune.train import run_training
    result = run_training(load_config("examples/quickstart.yaml"))

Modules: preflight.py (inputs, model, probe), batching.py (padded or packed batches), sft.py
(the run), trainer.py (H1Trainer), loss.py (the one shifted cross-entropy), arguments.py and
recipes.py (optimiser settings), run_dir.py (output directory, resume), callbacks.py and plots.py.
Importing this package stays light: run_training is imported on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_training", "TrainResult"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from h1tune.train import sft

        return getattr(sft, name)
    raise AttributeError(f"module 'h1tune.train' has no attribute {name!r}")
