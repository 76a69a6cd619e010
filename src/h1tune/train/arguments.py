"""TrainingArguments for an h1tune run: the config's fields over its recipe's defaults."""

from __future__ import annotations

from typing import Any

import torch

from h1tune.config import H1tuneConfig
from h1tune.model import dtype_name
from h1tune.precision import training_precision
from h1tune.train import recipes, strategies


def _report_to(requested: list[str]) -> list[str]:
    if requested != ["auto"]:
        return [r for r in requested if r != "none"]
    import importlib.util

    return ["tensorboard"] if importlib.util.find_spec("tensorboard") else []


def trainer_kwargs(cfg: H1tuneConfig, batch_tokens: int, has_eval: bool) -> tuple[dict[str, Any], dict]:
    """TrainingArguments fields from the config and its recipe (explicit fields win), and the recipe.

    A dict, not TrainingArguments, so TRL's configs (subclasses of it) take the same fields.
    """
    t = cfg.training
    opt = recipes.resolve_optimisation(cfg, batch_tokens)
    wsd = opt["lr_scheduler_type"] == recipes.WSD_EXP
    eval_steps = t.eval_steps or t.save_steps
    on_cuda = torch.cuda.is_available()
    dtype = dtype_name(cfg.model.dtype)
    args = dict(
        output_dir=cfg.output_dir,
        learning_rate=opt["learning_rate"],
        lr_scheduler_type="constant" if wsd else opt["lr_scheduler_type"],  # H1Trainer builds the WSD one
        warmup_steps=opt["warmup_ratio"],  # a float < 1 is a ratio of the total steps in transformers 5
        weight_decay=opt["weight_decay"],
        adam_beta1=opt["adam_beta1"],
        adam_beta2=opt["adam_beta2"],
        num_train_epochs=opt["schedule_epochs"],  # the schedule's length; StopAfterEpochs ends at t.num_train_epochs
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
        gradient_checkpointing_kwargs=checkpointing_kwargs(cfg) if t.gradient_checkpointing else None,
        bf16=training_precision(cfg).autocast,  # CUDA, or a CPU with native bf16 (h1tune.precision)
        fp16=dtype == "float16" and on_cuda,
        use_cpu=not on_cuda,
        report_to=_report_to(t.report_to),
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        disable_tqdm=True,
        save_only_model=False,
    )
    args.update(strategies.trainer_overrides(t))  # fsdp / deepspeed, the same under any launcher
    return args, {**opt, "wsd_exponential": wsd}


def checkpointing_kwargs(cfg: H1tuneConfig) -> dict[str, bool]:
    """Reentrant checkpointing on one process: a 0.5B LoRA step at 1,024 tokens peaked at 3.96 GiB with
    it and 4.85 GiB non-reentrant (same time). Several processes keep non-reentrant, which DDP and FSDP
    need (reentrant backward marks parameters ready twice)."""
    return {"use_reentrant": cfg.training.distributed == "none"}
