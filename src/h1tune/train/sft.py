"""Supervised fine-tuning of Falcon-H1 on top of the Hugging Face Trainer.

    h1tune train examples/quickstart.yaml

The Trainer owns the loop. h1tune owns what it gets wrong for Falcon-H1 or leaves to the user:
the data (assistant-only labels, exact packing), the adapter policy and its probe (preflight.py),
a token-weighted eval loss, atomic checkpoints with automatic resume, and a NaN stop (trainer.py).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from h1tune.config import H1tuneConfig, save_config
from h1tune.train import run_dir
from h1tune.train.arguments import trainer_kwargs
from h1tune.train.callbacks import MetricsLog, ProgressBar, schedule_callbacks
from h1tune.train.plots import plot_loss_curve
from h1tune.train.preflight import check_inputs, prepare_model
from h1tune.train.trainer import STAGING_DIR, H1Trainer

log = logging.getLogger("h1tune")


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    steps: int
    train_loss: float | None
    eval_metrics: dict[str, float]
    loss_curve: Path | None
    train_seconds: float


def run_training(cfg: H1tuneConfig, overwrite: bool = False, resume: bool = False,
                 callbacks: list | None = None) -> TrainResult:
    """Validate data, load the model, apply the adapter, probe it, train, and save the result."""
    inputs = check_inputs(cfg)  # fails before any weights load or any directory is claimed
    tokenizer = inputs.tokenizer
    resume_from = run_dir.prepare_output_dir(cfg, overwrite=overwrite, resume=resume)
    save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    ready = prepare_model(cfg, inputs)
    batches, model = ready.batches, ready.model
    if ready.probe is not None:
        print(ready.probe.summary_line())
        for line in ready.probe.format_group_lines():
            print(line)

    kwargs, opt = trainer_kwargs(cfg, batches.tokens_per_step(cfg.training), has_eval=batches.eval is not None)
    args = TrainingArguments(**kwargs)
    log.info("recipe %s: learning rate %.3g, schedule %s, warmup %.0f%%, betas (%s, %s), weight decay %s",
             opt["recipe"], opt["learning_rate"], opt["lr_scheduler_type"], 100 * opt["warmup_ratio"],
             opt["adam_beta1"], opt["adam_beta2"], opt["weight_decay"])
    trainer = H1Trainer(model=model, args=args, train_dataset=batches.train, eval_dataset=batches.eval,
                        data_collator=batches.collator, processing_class=tokenizer,
                        callbacks=[ProgressBar(), MetricsLog(cfg.output_dir), *schedule_callbacks(cfg, opt),
                                   *(callbacks or [])],
                        wsd_exponential=opt["wsd_exponential"])
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_seconds = time.perf_counter() - started
    eval_metrics = _final_eval(trainer) if batches.eval is not None else {}

    final_dir = _save_final(cfg, trainer, tokenizer)
    curve = plot_loss_curve(cfg.output_dir)
    run_dir.mark_finished(cfg)
    return TrainResult(Path(cfg.output_dir), final_dir, trainer.state.global_step, output.training_loss,
                       eval_metrics, curve, train_seconds)


def _final_eval(trainer: H1Trainer) -> dict:
    """The eval metrics at the last step: logged already when eval_steps divides it, else computed."""
    step = trainer.state.global_step
    logged = [h for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == step]
    return logged[-1] if logged else trainer.evaluate()


def _save_final(cfg: H1tuneConfig, trainer: Trainer, tokenizer) -> Path:
    """The adapter (PEFT format) or full model, with tokenizer and resolved config, written atomically."""
    root = Path(cfg.output_dir)
    final = root / run_dir.FINAL_DIR
    staged = root / STAGING_DIR / run_dir.FINAL_DIR
    shutil.rmtree(staged.parent, ignore_errors=True)
    trainer.model.save_pretrained(staged, safe_serialization=True)
    tokenizer.save_pretrained(staged)
    save_config(cfg, staged / "config.yaml")  # merge reads it to detect a QLoRA adapter
    run_dir.publish_checkpoint(staged, final)
    shutil.rmtree(staged.parent, ignore_errors=True)
    return final
