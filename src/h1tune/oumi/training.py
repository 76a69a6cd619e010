"""OUMI's `training` section onto h1tune's `training`, `adapter.method` and `output_dir`.

OUMI's defaults are mapped too wherever they differ from h1tune's (learning rate 5e-5, linear
schedule without warmup, 3 epochs, batch 8, ...): the file then runs OUMI's job, not h1tune's
recipe. DPO/KTO's beta and loss come from TRL's configs unless `trainer_kwargs` sets them.
"""

from __future__ import annotations

from typing import Any

from h1tune.errors import ConfigError
from h1tune.oumi.mapper import Section, enum_value, set_path
from h1tune.oumi.report import IGNORED, MAPPED, NOT_HONOURED

OBJECTIVES = {"trl_sft": "sft", "hf": "sft", "oumi": "sft", "trl_dpo": "dpo", "trl_kto": "kto"}
UNSUPPORTED_TRAINERS = ("trl_grpo", "trl_gkd", "trl_gold", "verl_grpo")
# TRL's defaults when trainer_kwargs leaves them out (DPOConfig / KTOConfig in TRL 1.16).
TRL_DEFAULTS = {"dpo": {"beta": 0.1, "loss_type": ["sigmoid"]}, "kto": {"beta": 0.1, "loss_type": ["kto"]}}
ADAMW = {"adamw_torch", "adamw_torch_fused", "adamw_hf"}
MULTI_PROCESS = "multi-GPU detail; h1tune's launcher and strategy settings choose their own"
SPEED_ONLY = "speed only: h1tune tokenises up front and batches in memory"


def objective_of(trainer_type: Any) -> str:
    """h1tune's training.objective for OUMI's trainer_type (OUMI's default is HF)."""
    key = enum_value(trainer_type if trainer_type is not None else "hf")
    if key in OBJECTIVES:
        return OBJECTIVES[key]
    if key in UNSUPPORTED_TRAINERS:
        raise ConfigError(f"training.trainer_type: {trainer_type} is not supported by h1tune, which trains sft "
                          "(TRL_SFT, HF, OUMI), dpo (TRL_DPO) and kto (TRL_KTO); run this config with OUMI")
    raise ConfigError(f"training.trainer_type: {trainer_type!r} is not an OUMI trainer type; choose from "
                      f"{', '.join(k.upper() for k in (*OBJECTIVES, *UNSUPPORTED_TRAINERS))}")


def map_training(sec: Section, objective: str, has_eval: bool) -> None:
    sec.map("trainer_type", "training.objective", default="HF", convert=lambda _: objective)
    sec.map("use_peft", "adapter.method", default=False, convert=lambda v: "lora" if v else "full")
    sec.map("output_dir", "output_dir", default="output", note="relative to the current directory, as in OUMI")
    _map_optimisation(sec)
    _map_loop(sec, has_eval)
    _map_reporting(sec)
    _map_trainer_kwargs(sec, objective)
    _refuse_other_trainers(sec)
    _ignore_machinery(sec)


def _map_optimisation(sec: Section) -> None:
    sec.map("learning_rate", "training.learning_rate", default=5e-05)
    sec.map("lr_scheduler_type", "training.lr_scheduler_type", default="linear")
    sec.refuse("lr_scheduler_kwargs", "h1tune passes no scheduler arguments")
    sec.map("warmup_ratio", "training.warmup_ratio", default=None, convert=lambda v: v or 0.0,
            note="" if sec.get("warmup_ratio") else "no warmup")
    sec.refuse("warmup_steps", "h1tune sets warmup as a ratio: set training.warmup_ratio = warmup_steps / total steps")
    sec.agree("optimizer", ADAMW, "AdamW, h1tune's optimiser (torch's fused implementation): the same update",
              otherwise="h1tune trains with AdamW only", default="adamw_torch")
    sec.map("weight_decay", "training.weight_decay", default=0.0)
    sec.map("adam_beta1", "training.adam_beta1", default=0.9)
    sec.map("adam_beta2", "training.adam_beta2", default=0.999)
    sec.agree("adam_epsilon", lambda v: float(v) == 1e-8, "1e-8, as h1tune",
              otherwise="h1tune uses AdamW's epsilon 1e-8")
    sec.ignore("sgd_momentum", "optimizer sgd only")
    sec.map("max_grad_norm", "training.max_grad_norm", default=1.0, convert=lambda v: 0.0 if v is None else v)
    sec.agree("mixed_precision_dtype", lambda v: v is None or str(v).lower() == "none",
              "none: training runs in model.dtype, as h1tune", otherwise="h1tune's precision follows model.dtype "
              "(its weights and autocast); set model.dtype instead")
    sec.agree("compile", {False}, "no compilation, as h1tune", otherwise="h1tune does not torch.compile the model")
    sec.agree("label_ignore_index", {None, -100}, "-100, as h1tune", otherwise="h1tune masks labels with -100")


def _map_loop(sec: Section, has_eval: bool) -> None:
    sec.map("num_train_epochs", "training.num_train_epochs", default=3)
    sec.map("max_steps", "training.max_steps")
    sec.map("per_device_train_batch_size", "training.per_device_train_batch_size", default=8)
    sec.map("per_device_eval_batch_size", "training.per_device_eval_batch_size")
    sec.map("gradient_accumulation_steps", "training.gradient_accumulation_steps")
    sec.map("enable_gradient_checkpointing", "training.gradient_checkpointing")
    sec.agree("gradient_checkpointing_kwargs", lambda v: set((v or {}).items()) <= {("use_reentrant", False)},
              "h1tune always checkpoints with use_reentrant: false", otherwise="h1tune checkpoints with "
              "use_reentrant: false and no other arguments")
    if sec.get("save_steps", 500) > 0:
        sec.map("save_steps", "training.save_steps", default=500, note="atomic checkpoints, resumable")
    else:
        sec.note(NOT_HONOURED, "save_steps", "h1tune always checkpoints (for resume); it keeps training.save_steps")
    sec.agree("save_epoch", {False}, "h1tune checkpoints by steps", otherwise="h1tune checkpoints every "
              "training.save_steps, not per epoch")
    sec.agree("save_final_model", {True}, "h1tune saves OUTPUT_DIR/final", otherwise="h1tune always saves "
              "OUTPUT_DIR/final")
    sec.map("seed", "training.seed")
    sec.agree("data_seed", lambda v: v == sec.get("seed", 42), "equal to seed: h1tune orders data with "
              "training.seed", otherwise="h1tune orders data with training.seed")
    for key in ("use_deterministic", "full_determinism"):
        sec.agree(key, {False}, "not requested", ok_kind=IGNORED, otherwise="h1tune seeds everything "
                  "(training.seed) but does not force deterministic kernels")
    _map_eval(sec, has_eval)


def _map_eval(sec: Section, has_eval: bool) -> None:
    strategy = str(sec.get("eval_strategy", "no")).lower()
    if strategy == "steps":
        sec.agree("eval_strategy", {"steps"}, "h1tune evaluates every training.eval_steps", otherwise="")
        sec.map("eval_steps", "training.eval_steps", default=500)
        return
    if has_eval:
        sec.agree("eval_strategy", lambda _: False, "", default="no", otherwise="h1tune evaluates its eval data "
                  "every training.eval_steps (training.save_steps unless set) and at the end")
    else:
        sec.ignore("eval_strategy", "no validation datasets")
    sec.map("eval_steps", "training.eval_steps")  # only when the file sets it


def _map_reporting(sec: Section) -> None:
    sec.map("enable_tensorboard", "training.report_to", default=True, convert=lambda on: ["auto"] if on else ["none"],
            note="auto = TensorBoard when installed; metrics.jsonl always")
    for key, name in (("enable_wandb", "wandb"), ("enable_mlflow", "mlflow")):
        sec.agree(key, {False}, "not requested", ok_kind=IGNORED, otherwise=f"not logged to {name} (it needs an "
                  f"account and network); h1tune writes OUTPUT_DIR/metrics.jsonl; add it with --set "
                  f"training.report_to=[{name},tensorboard]")
    sec.agree("logging_strategy", {"steps"}, "h1tune logs every training.logging_steps",
              otherwise="h1tune logs by steps only (training.logging_steps)")
    sec.map("logging_steps", "training.logging_steps", default=50)
    for key in ("logging_dir", "logging_first_step", "log_level", "dep_log_level", "log_examples", "run_name"):
        sec.ignore(key, "logging detail; h1tune logs to OUTPUT_DIR (metrics.jsonl, loss_curve.png)")
    for key in ("include_performance_metrics", "include_alternative_mfu_metrics", "log_model_summary"):
        sec.ignore(key, "reporting only; h1tune shows tokens/s and the trainable-parameter table")
    sec.refuse("metrics_function", "h1tune's eval reports loss and perplexity (h1tune eval for more)")


def _map_trainer_kwargs(sec: Section, objective: str) -> None:
    """TRL config fields passed through trainer_kwargs: beta and loss_type for DPO/KTO, max_length."""
    sec.consulted.add("trainer_kwargs")
    kwargs: dict[str, Any] = dict(sec.get("trainer_kwargs") or {})
    targets = {"max_length": "data.max_length", "packing": "data.packing"}
    if objective != "sft":
        targets |= {"beta": "training.beta", "loss_type": "training.loss_type"}
        for key, value in TRL_DEFAULTS[objective].items():
            if key not in kwargs:
                sec.report.add(MAPPED, f"training.trainer_kwargs.{key}", value, targets[key], value,
                               reason=f"TRL's {objective.upper()} default", default=True)
                set_path(sec.tree, targets[key], value)
    for key, value in kwargs.items():
        if key in targets:
            value = [value] if key == "loss_type" and isinstance(value, str) else value
            sec.report.add(MAPPED, f"training.trainer_kwargs.{key}", value, targets[key], value)
            set_path(sec.tree, targets[key], value)
        else:
            sec.report.add(NOT_HONOURED, f"training.trainer_kwargs.{key}", value,
                           reason=f"h1tune does not pass TRL arguments through (it maps only {', '.join(targets)})")


def _refuse_other_trainers(sec: Section) -> None:
    for key in ("reward_functions", "reward_function_kwargs", "grpo", "gkd", "gold", "verl_config_overrides"):
        sec.refuse(key, "GRPO / GKD / GOLD / verl only; h1tune trains sft, dpo and kto")


def _ignore_machinery(sec: Section) -> None:
    sec.refuse("resume_from_checkpoint", "h1tune resumes from the last complete checkpoint in output_dir "
               "(automatically when the config is unchanged, or with --resume)")
    sec.ignore("try_resume_from_last_checkpoint", "h1tune resumes from output_dir's last complete checkpoint itself")
    for key in ("dataloader_num_workers", "dataloader_persistent_workers", "dataloader_prefetch_factor",
                "dataloader_main_process_only"):
        sec.ignore(key, SPEED_ONLY)
    for key in ("ddp_find_unused_parameters", "nccl_default_timeout_minutes"):
        sec.ignore(key, MULTI_PROCESS)
    sec.ignore("empty_device_cache_steps", "memory housekeeping; does not change the result")
    sec.ignore("profiler", "profiling only")
    sec.ignore("telemetry", "telemetry only")
