"""H1Trainer: the Hugging Face Trainer plus what h1tune guarantees on every run.

A NaN/inf stop, a token-weighted eval loss (h1tune.train.loss), TII's warmup-stable-exponential
schedule, and atomic checkpoints (staged, marked complete, renamed into place).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
from transformers import Trainer

from h1tune.errors import H1tuneError
from h1tune.train import recipes, run_dir
from h1tune.train.loss import shifted_cross_entropy, token_loss_sum

__all__ = ["H1Trainer", "H1TrainerMixin", "STAGING_DIR", "shifted_cross_entropy", "token_loss_sum"]

STAGING_DIR = ".staging"


class H1TrainerMixin:
    """What every h1tune trainer adds to a Trainer (the HF one, or TRL's DPO/KTO trainers, which
    subclass it): the NaN stop, the WSD-exponential schedule and atomic checkpoints."""

    def __init__(self, *args, wsd_exponential: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.wsd_exponential = wsd_exponential

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            raise H1tuneError(
                f"loss became {loss.item()} at step {self.state.global_step + 1}; training stopped. The last "
                "complete checkpoint is kept. Lower training.learning_rate, check the data, or use fp32")
        return loss

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None and self.wsd_exponential:
            self.lr_scheduler = recipes.build_wsd_exponential(
                optimizer or self.optimizer, self.args.get_warmup_steps(num_training_steps), num_training_steps)
            self._created_lr_scheduler = True
        return super().create_scheduler(num_training_steps, optimizer)

    def save_final(self, path) -> None:
        """The trained weights of the final directory: the adapter (PEFT format) or the full model."""
        self.model.save_pretrained(path, safe_serialization=True)

    def _save_checkpoint(self, model, trial):
        """Write the checkpoint into a staging dir, then publish it with a marker and one rename."""
        root = Path(self.args.output_dir)
        staging_root = root / STAGING_DIR
        shutil.rmtree(staging_root, ignore_errors=True)
        keep = self.args.save_total_limit
        self.args.output_dir, self.args.save_total_limit = str(staging_root), None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir, self.args.save_total_limit = str(root), keep
        name = f"checkpoint-{self.state.global_step}"
        run_dir.publish_checkpoint(staging_root / name, root / name)
        shutil.rmtree(staging_root, ignore_errors=True)
        run_dir.rotate_checkpoints(root, keep)


class H1Trainer(H1TrainerMixin, Trainer):
    """The HF Trainer with h1tune's guarantees (H1TrainerMixin) and a token-weighted evaluation."""

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """Loss summed over every labelled token of the eval set, divided once: independent of batch
        size and padding (the Trainer's default averages per-batch means)."""
        dataloader = self.get_eval_dataloader(eval_dataset)
        model = self.model
        was_training = model.training
        model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64)
        tokens = 0
        with torch.no_grad():
            for batch in dataloader:
                batch = self._prepare_inputs(batch)
                loss, count = token_loss_sum(model, batch)
                loss_sum += loss.double().cpu()
                tokens += count
        model.train(was_training)
        mean = (loss_sum / max(tokens, 1)).item()
        metrics = {f"{metric_key_prefix}_loss": mean,
                   f"{metric_key_prefix}_perplexity": math.exp(min(mean, 50.0)),
                   f"{metric_key_prefix}_tokens": tokens}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
