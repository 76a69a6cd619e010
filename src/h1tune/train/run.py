"""One training run of any objective (SFT, DPO/KTO, GRPO): `h1tune train CONFIG`.

    h1tune train examples/quickstart.yaml

The Trainer (or TRL's trainer for the objective: sft.py, preference.py, grpo.py) owns the loop. h1tune owns
what it gets wrong for Falcon-H1 or leaves to the user: the data (assistant-only labels, exact packing), the
adapter policy and its probe (preflight.py), the memory plan, a token-weighted eval loss, atomic checkpoints
with automatic resume, and a NaN stop (trainer.py).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from h1tune.adapters.checkpoint import is_adapter_dir, record_base
from h1tune.config import H1tuneConfig, absolute_paths, save_config
from h1tune.errors import H1tuneError
from h1tune.train import ranks, run_dir
from h1tune.train.arguments import trainer_kwargs
from h1tune.train.callbacks import MetricsLog, ProgressBar, schedule_callbacks
from h1tune.train.plots import plot_loss_curve, plot_rewards_curve
from h1tune.train.preflight import check_inputs, prepare_model
from h1tune.train.sft import build_sft_trainer, sft_logit_tokens
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
    resumed_from_step: int = 0  # train_loss covers the steps after it (this process's part of the run)
    phases: dict[str, float] = field(default_factory=dict)  # wall seconds per phase (Clock)


def run_training(cfg: H1tuneConfig, overwrite: bool = False, resume: bool | str = False,
                 callbacks: list | None = None) -> TrainResult:
    """Check everything cheap, claim the output dir, load and probe, train, and save the result.

    Nothing is written until the cheap checks pass (output dir free, loggers installed, the model's
    config.json, chat template, data); a run that fails before its first step removes the directory
    it created, so the corrected rerun starts clean.
    """
    clock = Clock()
    cfg = absolute_paths(cfg)
    ranks.on_main(lambda: run_dir.check_output_dir(cfg, overwrite=overwrite, resume=resume))
    inputs = check_inputs(cfg, show=print if ranks.is_main() else lambda *_: None)  # every rank prepares the data
    clock.lap("data")
    claim = ranks.on_main(lambda: run_dir.claim_output_dir(cfg, overwrite=overwrite, resume=resume))
    try:
        return _train(cfg, inputs, claim, callbacks or [], clock)
    except BaseException:
        if ranks.is_main():  # the claim is the main process's (ranks.py)
            run_dir.release_failed(claim)
        raise


class _FirstStep(TrainerCallback):
    """Marks the claim as started: from then on a failure keeps the run directory (checkpoints, metrics)."""

    def __init__(self, claim: run_dir.Claim):
        self.claim = claim

    def on_step_end(self, args, state, control, **kwargs):
        self.claim.started = True


def _train(cfg: H1tuneConfig, inputs, claim: run_dir.Claim, callbacks: list, clock: "Clock") -> TrainResult:
    ready = prepare_model(cfg, inputs)  # every rank probes the same seeded model; the main one reports
    clock.lap("model", minus=ready.probe.seconds if ready.probe is not None else 0.0)
    if ready.probe is not None:
        clock.phases["probe"] = ready.probe.seconds
    _report_preflight(ready)
    batches = ready.batches
    run_cfg = with_memory_plan(cfg, ready)
    kwargs, opt = trainer_kwargs(run_cfg, batches.tokens_per_step(cfg.training), has_eval=batches.eval is not None)
    resolved = resolved_config(run_cfg, opt)
    if ranks.is_main():
        save_config(resolved, claim.root / "config.yaml")  # fully resolved: reruns from any directory
        run_dir.write_run_marker(claim.root / run_dir.RUN_FILE, cfg, resolved, finished=False)
    log.info("recipe %s: learning rate %.3g, schedule %s, warmup %.0f%%, betas (%s, %s), weight decay %s",
             opt["recipe"], opt["learning_rate"], opt["lr_scheduler_type"], 100 * opt["warmup_ratio"],
             opt["adam_beta1"], opt["adam_beta2"], opt["weight_decay"])
    callbacks = [ProgressBar(), MetricsLog(cfg.output_dir), *schedule_callbacks(cfg, opt), _FirstStep(claim),
                 *callbacks]
    trainer = _build_trainer(run_cfg, ready, inputs.tokenizer, kwargs, opt, callbacks)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    clock.lap("set-up")
    output = trainer.train(resume_from_checkpoint=str(claim.resume_from) if claim.resume_from else None)
    train_seconds = clock.lap("training")
    eval_metrics = _final_eval(trainer) if batches.eval is not None else {}
    clock.lap("final eval")
    final_dir = _save_final(resolved, trainer, inputs.tokenizer)
    curve = None
    if ranks.is_main():
        curve = plot_loss_curve(cfg.output_dir)
        plot_rewards_curve(cfg.output_dir)  # dpo/kto: margin and accuracy beside the loss curve
        run_dir.mark_finished(cfg, resolved)
    clock.lap("saving")
    resumed = int(claim.resume_from.name.split("-")[1]) if claim.resume_from else 0
    return TrainResult(Path(cfg.output_dir), final_dir, trainer.state.global_step, output.training_loss,
                       eval_metrics, curve, train_seconds, resumed_from_step=resumed, phases=clock.phases)


def _report_preflight(ready) -> None:
    """The probe's line per group and the bf16-vs-fp32 loss gap, from the main process."""
    if not ranks.is_main():
        return
    if ready.probe is not None:
        print(ready.probe.summary_line())
        for line in ready.probe.format_group_lines():
            print(f"  {line}")
    if ready.fp32_gap:
        print(f"precision: {ready.fp32_gap}")


class Clock:
    """Wall time per phase of a run, so a user sees what share the training loop itself takes."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def lap(self, name: str, minus: float = 0.0) -> float:
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self.last - minus
        self.last = now
        return self.phases[name]


def _build_trainer(cfg: H1tuneConfig, ready, tokenizer, kwargs: dict, opt: dict, callbacks: list):
    """The objective's trainer (sft.py, preference.py, grpo.py); a set-up error becomes one paragraph that says
    what to change."""
    objective = cfg.training.objective
    try:
        if objective == "grpo":
            from h1tune.train.grpo import build_grpo_trainer as build
        elif objective in ("dpo", "kto"):
            from h1tune.train.preference import build_preference_trainer as build
        else:
            build = build_sft_trainer
        return build(cfg, ready, tokenizer, kwargs, opt, callbacks)
    except (ValueError, ImportError, RuntimeError, TypeError) as exc:
        raise H1tuneError(f"the trainer could not be set up: {type(exc).__name__}: {exc}. Nothing was trained and "
                          "the run directory was removed; fix the training section (or the environment) and "
                          "rerun") from None


# Keeping freed memory (precision.keep_freed_memory) raised a 32K-token tiny step's peak RSS from 7.1 to
# 10.8 GiB (x1.5) while halving its time (bench/seq_scaling.py): only where the estimate has that room.
# Checkpointed long steps fragment the kept heap more: Tiny-90M at 32K with it forced on (H1TUNE_KEEP_MEMORY=1)
# was past 20 GiB RSS in its second step and growing (7.0 GiB peak with glibc's default); this rule declines it.
KEPT_MEMORY_FACTOR = 1.6


def with_memory_plan(cfg: H1tuneConfig, ready) -> H1tuneConfig:
    """The config with gradient checkpointing decided by the memory estimate (refused when it cannot fit), and
    freed memory kept in the process when the estimate leaves room for it."""
    from h1tune.precision import keep_freed_memory
    from h1tune.train.memory import FIT_FRACTION, plan_memory, refusal

    tokens = ready.batches.micro_batch_tokens(cfg.training) // cfg.training.context_parallel  # a rank's slice
    act_bytes = 2 if ready.precision is not None and ready.precision.autocast else 4
    plan = plan_memory(cfg.training.gradient_checkpointing, ready.model, tokens, act_bytes,
                       logit_tokens=sft_logit_tokens(cfg, ready.model))
    why = refusal(plan, tokens)
    if why:
        raise H1tuneError(f"not enough memory: {why}")
    print(f"gradient checkpointing {plan.summary()}")
    room = bool(plan.available) and plan.estimate * KEPT_MEMORY_FACTOR < plan.available * FIT_FRACTION
    if keep_freed_memory(room):
        log.info("freed memory kept in the process between steps (faster long steps; %s)",
                 "the memory plan leaves room" if room else "H1TUNE_KEEP_MEMORY=1")
    return cfg.model_copy(update={"training": cfg.training.model_copy(update={"gradient_checkpointing": plan.checkpointing})})


def resolved_config(cfg: H1tuneConfig, opt: dict) -> H1tuneConfig:
    """The config with the recipe's values written in (learning rate, schedule, betas...): what was used."""
    fields = ["recipe", "learning_rate", "lr_scheduler_type", "warmup_ratio", "weight_decay", "adam_beta1",
              "adam_beta2"]
    if cfg.training.objective != "sft":
        fields += ["beta", "loss_type", "schedule_epochs"]
    training = cfg.training.model_copy(update={f: opt[f] for f in fields if f in opt and opt[f] is not None})
    return cfg.model_copy(update={"training": training})


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
    if ranks.is_main():
        shutil.rmtree(staged.parent, ignore_errors=True)
    ranks.barrier()
    trainer.save_final(staged)  # collective under FSDP / ZeRO-3; the main process writes
    if not ranks.is_main():
        ranks.barrier()
        return final
    if is_adapter_dir(staged):  # peft wrote the base's local path (a cache dir for presets)
        record_base(staged, cfg.model.name_or_path)
    tokenizer.save_pretrained(staged)
    save_config(cfg, staged / "config.yaml")  # merge reads it to detect a QLoRA adapter
    run_dir.publish_checkpoint(staged, final)
    shutil.rmtree(staged.parent, ignore_errors=True)
    ranks.barrier()  # the others return once final/ is in place
    return final
