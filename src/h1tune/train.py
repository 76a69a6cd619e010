"""Supervised fine-tuning of Falcon-H1 on top of the Hugging Face Trainer.

    h1tune train examples/quickstart.yaml

The Trainer owns the loop. h1tune owns what it gets wrong for Falcon-H1 or leaves to the user:
the data (assistant-only labels, exact packing), the adapter policy and its probe, a
token-weighted eval loss, atomic checkpoints with automatic resume, and a NaN stop.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from h1tune import recipes, run_dir
from h1tune.callbacks import MetricsLog, ProgressBar, plot_loss_curve
from h1tune.config import H1tuneConfig, save_config
from h1tune.errors import H1tuneError

log = logging.getLogger("h1tune")
STAGING_DIR = ".staging"


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    steps: int
    train_loss: float | None
    eval_metrics: dict[str, float]
    loss_curve: Path | None
    train_seconds: float


class H1Trainer(Trainer):
    """The HF Trainer with h1tune's NaN stop, token-weighted evaluation, WSD-exponential schedule,
    and atomic checkpoints."""

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


def token_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled tokens, and their count."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    shifted = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), shifted.reshape(-1),
        ignore_index=-100, reduction="sum")
    return loss, int((shifted != -100).sum())


def _report_to(requested: list[str]) -> list[str]:
    if requested != ["auto"]:
        return [r for r in requested if r != "none"]
    import importlib.util

    return ["tensorboard"] if importlib.util.find_spec("tensorboard") else []


def training_arguments(cfg: H1tuneConfig, batch_tokens: int, has_eval: bool) -> tuple[TrainingArguments, dict]:
    """TrainingArguments from the config and its recipe (explicit fields win)."""
    t = cfg.training
    opt = recipes.resolve_optimisation(cfg, batch_tokens)
    wsd = opt["lr_scheduler_type"] == recipes.WSD_EXP
    eval_steps = t.eval_steps or t.save_steps
    on_cuda = torch.cuda.is_available()
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("bfloat16" if on_cuda else "float32")
    args = TrainingArguments(
        output_dir=cfg.output_dir,
        learning_rate=opt["learning_rate"],
        lr_scheduler_type="constant" if wsd else opt["lr_scheduler_type"],  # H1Trainer builds the WSD one
        warmup_steps=opt["warmup_ratio"],  # a float < 1 is a ratio of the total steps in transformers 5
        weight_decay=opt["weight_decay"],
        adam_beta1=opt["adam_beta1"],
        adam_beta2=opt["adam_beta2"],
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        bf16=dtype == "bfloat16" and on_cuda,
        fp16=dtype == "float16" and on_cuda,
        use_cpu=not on_cuda,
        report_to=_report_to(t.report_to),
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        disable_tqdm=True,
        save_only_model=False,
    )
    return args, {**opt, "wsd_exponential": wsd}


def run_training(cfg: H1tuneConfig, overwrite: bool = False, resume: bool = False,
                 callbacks: list | None = None) -> TrainResult:
    """Validate data, load the model, apply the adapter, probe it, train, and save the result."""
    from h1tune.adapters import apply_adapter
    from h1tune.batching import make_batches
    from h1tune.data import prepare_datasets
    from h1tune.model import load_model, load_tokenizer
    from h1tune.probe import probe_adapters

    tokenizer = load_tokenizer(cfg.model)
    data = prepare_datasets(cfg.data, tokenizer, seed=cfg.training.seed)  # fails before any weights load
    print(data.summary.format())
    resume_from = run_dir.prepare_output_dir(cfg, overwrite=overwrite, resume=resume)
    save_config(cfg, Path(cfg.output_dir) / "config.yaml")

    batches = make_batches(cfg.data, tokenizer, data.train, data.eval)
    model = load_model(cfg.model)
    model.config.use_cache = False
    set_seed(cfg.training.seed)  # LoRA's initial A matrices come from the RNG: same seed, same run
    model = apply_adapter(model, cfg)
    if cfg.adapter.probe:  # LoRA: every adapter; full fine-tuning: every module with trainable weights
        report = probe_adapters(model, batches.probe_batch())
        for line in report.format_group_lines():
            print(line)

    args, opt = training_arguments(cfg, batches.tokens_per_step(cfg.training), has_eval=batches.eval is not None)
    log.info("recipe %s: learning rate %.3g, schedule %s, warmup %.0f%%, betas (%s, %s), weight decay %s",
             opt["recipe"], opt["learning_rate"], opt["lr_scheduler_type"], 100 * opt["warmup_ratio"],
             opt["adam_beta1"], opt["adam_beta2"], opt["weight_decay"])
    trainer = H1Trainer(model=model, args=args, train_dataset=batches.train, eval_dataset=batches.eval,
                        data_collator=batches.collator, processing_class=tokenizer,
                        callbacks=[ProgressBar(), MetricsLog(cfg.output_dir), *(callbacks or [])],
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
