"""The distributed strategies h1tune ships, as data: which accelerate config launches each one, and
the Trainer settings that run it.

    accelerate_config("fsdp")            # h1tune/resources/accelerate/fsdp.yaml, for `accelerate launch`
    trainer_overrides(cfg.training)      # {"fsdp": True, "fsdp_config": {...}} for TrainingArguments

The same files feed both, so a run started by `h1tune train --nproc N`, by the user's own
`accelerate launch -m h1tune.cli train ...` or by `torchrun -m h1tune.cli train ...` shards the same
way: the Trainer gets the strategy from TrainingArguments, not only from the launcher's environment
(torchrun sets none). Only `training.distributed: none` leaves the choice to the launcher.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, get_args

import yaml

from h1tune.config import Distributed, H1tuneConfig, TrainingConfig

STRATEGIES: tuple[str, ...] = get_args(Distributed)
# none under a launcher is plain data parallelism, which is what `accelerate launch` does by default
ACCELERATE_FILES = {"none": "ddp.yaml", "ddp": "ddp.yaml", "fsdp": "fsdp.yaml",
                    "deepspeed_zero2": "deepspeed.yaml", "deepspeed_zero3": "deepspeed.yaml"}
DEEPSPEED_FILES = {"deepspeed_zero2": "zero2.json", "deepspeed_zero3": "zero3.json"}
NEEDS_CUDA = ("fsdp", "deepspeed_zero2", "deepspeed_zero3")  # accelerate enables FSDP on GPUs only


def resource(name: str) -> Path:
    """A file shipped in h1tune/resources/accelerate/."""
    return Path(str(resources.files("h1tune.resources").joinpath("accelerate").joinpath(name)))


def accelerate_config(strategy: str) -> Path:
    return resource(ACCELERATE_FILES[strategy])


def deepspeed_config(strategy: str) -> Path | None:
    return resource(DEEPSPEED_FILES[strategy]) if strategy in DEEPSPEED_FILES else None


def fsdp_settings(activation_checkpointing: bool) -> dict[str, Any]:
    """fsdp.yaml's fsdp_config as TrainingArguments.fsdp_config takes it (keys without `fsdp_`).

    FSDP's own activation checkpointing replaces the model's gradient checkpointing: with both, every
    checkpointed layer is gathered twice in the backward pass (transformers refuses the pair).
    """
    section = yaml.safe_load(accelerate_config("fsdp").read_text())["fsdp_config"]
    settings = {key.removeprefix("fsdp_"): value for key, value in section.items()}
    settings["activation_checkpointing"] = activation_checkpointing
    return settings


def trainer_overrides(training: TrainingConfig) -> dict[str, Any]:
    """TrainingArguments fields that select the strategy (empty for none and ddp: DDP needs none)."""
    strategy = training.distributed
    if strategy == "fsdp":  # auto (not yet resolved by the memory plan) checkpoints, as the launcher assumes
        return {"fsdp": True, "fsdp_config": fsdp_settings(training.gradient_checkpointing is not False),
                "gradient_checkpointing": False, "gradient_checkpointing_kwargs": None}
    if strategy in DEEPSPEED_FILES:
        return {"deepspeed": str(deepspeed_config(strategy))}
    return {}


def shards_4bit_weights(cfg: H1tuneConfig) -> bool:
    """QLoRA under FSDP: the 4-bit weights must be stored in the compute dtype (bnb_4bit_quant_storage),
    because FSDP shards floating-point tensors only (bitsandbytes' FSDP-QLoRA guide)."""
    return cfg.model.quantization == "4bit" and cfg.training.distributed == "fsdp"
