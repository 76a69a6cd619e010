"""Trainer callbacks a user watches: a progress bar (loss, tokens/s, ETA) and JSON-lines metrics
(the loss-curve PNG drawn from them at the end is plots.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback

from h1tune.train.run_dir import METRICS_FILE


class ProgressBar(TrainerCallback):
    """One tqdm bar over optimiser steps, with the last loss and non-padding tokens per second."""

    def __init__(self):
        self.bar = None
        self.started = 0.0
        self.tokens_at_start = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:  # one bar per run, not one per rank
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                        dynamic_ncols=True)
        self.started = time.perf_counter()
        self.tokens_at_start = state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is None:
            return
        self.bar.update(state.global_step - self.bar.n)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        tokens = state.num_input_tokens_seen - self.tokens_at_start
        loss = next((h["loss"] for h in reversed(state.log_history) if "loss" in h), None)
        postfix = {"tok/s": f"{tokens / elapsed:,.0f}"}
        if loss is not None:
            postfix = {"loss": f"{loss:.4f}", **postfix}
        self.bar.set_postfix(postfix, refresh=False)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.bar is not None and metrics:
            self.bar.write(f"step {state.global_step}: eval_loss {metrics.get('eval_loss', float('nan')):.4f} "
                           f"perplexity {metrics.get('eval_perplexity', float('nan')):.2f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MetricsLog(TrainerCallback):
    """Every logged metric as one JSON line, so runs can be compared and plotted without TensorBoard."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / METRICS_FILE

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:  # every rank logs; the main process writes
            return
        record = {"step": state.global_step, "time": time.time(), **logs}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class StopAfterEpochs(TrainerCallback):
    """End training after `epochs` while the LR schedule was built for more (TII's DPO: a 2-epoch
    linear decay, stopped after one epoch, worked better than a 1-epoch schedule)."""

    def __init__(self, epochs: float):
        self.epochs = epochs

    def on_step_end(self, args, state, control, **kwargs):
        if state.epoch is not None and state.epoch >= self.epochs - 1e-9:
            control.should_training_stop = True


def schedule_callbacks(cfg, opt: dict) -> list[TrainerCallback]:
    """[StopAfterEpochs] when the schedule spans more epochs than training runs (and max_steps is unset)."""
    epochs = cfg.training.num_train_epochs
    if cfg.training.max_steps > 0 or opt["schedule_epochs"] <= epochs:
        return []
    return [StopAfterEpochs(epochs)]

