"""Checks across config fields: objectives, their recipes, losses and rewards, and distributed strategies.

Each returns the problems it finds, each naming the field and the choice that fixes it;
`h1tune.config` collects them into one ConfigError. No imports of h1tune.config (it imports this).
"""

from __future__ import annotations

from typing import Any

H1tuneConfig = Any  # h1tune.config.H1tuneConfig, which imports this module (no import back: no cycle)

# TRL 1.16's loss names (DPOConfig.loss_type / KTOConfig.loss_type); a test checks them against TRL.
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
BUILTIN_NAMES = ("math_answer", "think_format", "tool_call", "length")  # h1tune.rewards' built-ins
GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo")

_OBJECTIVE_RECIPES = {"sft": ("lora", "tii_sft"), "dpo": ("tii_dpo", "dpo"), "kto": ("kto",), "grpo": ("grpo", "h1r_grpo")}


def objective_checks(cfg: H1tuneConfig) -> list[str]:
    """Recipe, loss names and options that belong to another objective."""
    t, problems = cfg.training, []
    if t.recipe and t.recipe not in _OBJECTIVE_RECIPES[t.objective]:
        problems.append(f"training.recipe: {t.recipe!r} is not a recipe for training.objective {t.objective!r}; "
                        f"choose from {', '.join(_OBJECTIVE_RECIPES[t.objective])}")
    if t.objective == "sft":
        problems += [f"training.{name}: applies to objective dpo, kto or grpo; set training.objective or remove it"
                     for name in ("beta", "loss_type") if getattr(t, name) is not None]
    else:
        names = {"dpo": DPO_LOSS_TYPES, "kto": KTO_LOSS_TYPES, "grpo": GRPO_LOSS_TYPES}[t.objective]
        problems += [f"training.loss_type: {name!r} is not a TRL {t.objective.upper()} loss; choose from "
                     f"{', '.join(names)}" for name in t.loss_type or () if name not in names]
    if t.objective == "kto" and t.loss_type and len(t.loss_type) > 1:
        problems.append("training.loss_type: KTO takes one loss name")
    if cfg.model.adapter and cfg.adapter.method == "full":
        problems.append("model.adapter: continuing a LoRA adapter needs adapter.method: lora; for full fine-tuning "
                        "merge it first (h1tune merge ADAPTER OUT) and set model.name_or_path to the merged model")
    if t.schedule_epochs is not None and t.schedule_epochs < t.num_train_epochs:
        problems.append(f"training.schedule_epochs: {t.schedule_epochs:g} is shorter than training.num_train_epochs "
                        f"({t.num_train_epochs:g}); the schedule must cover the epochs trained")
    if t.objective == "kto" and "kto" in (t.loss_type or ["kto"]) and t.per_device_train_batch_size < 2:
        problems.append("training.per_device_train_batch_size: KTO estimates its KL term from the other completions "
                        "of the batch, so it needs at least 2 (or training.loss_type: apo_zero_unpaired)")
    if t.objective == "kto" and cfg.data.packing:
        problems.append("data.packing: not supported with objective kto yet (its KL term pairs completions across "
                        "the batch); set data.packing: false")
    return problems + grpo_checks(cfg)


def context_parallel_checks(cfg: H1tuneConfig) -> list[str]:
    """Context parallelism splits packed SFT rows over DDP processes; every other pairing is refused."""
    t, problems = cfg.training, []
    if t.context_parallel == 1:
        return problems
    if t.objective != "sft":
        problems.append(f"training.context_parallel: splits SFT rows; objective {t.objective} is not supported yet "
                        "(set training.context_parallel: 1)")
    if not cfg.data.packing:
        problems.append("training.context_parallel: needs data.packing: true (the slices carry document ids that "
                        "tell each rank where a document continues)")
    if t.distributed not in ("none", "ddp"):
        problems.append(f"training.context_parallel: runs with training.distributed: ddp, not {t.distributed!r}")
    return problems


def distributed_checks(cfg: H1tuneConfig) -> list[str]:
    """Strategy and quantization pairs that cannot shard, each with what to choose instead; context parallelism."""
    return context_parallel_checks(cfg) + _strategy_checks(cfg)


def _strategy_checks(cfg: H1tuneConfig) -> list[str]:
    strategy, quant = cfg.training.distributed, cfg.model.quantization
    if quant == "8bit" and strategy not in ("none", "ddp"):
        return [f"training.distributed: {strategy!r} cannot run model.quantization: '8bit' (bitsandbytes' int8 "
                "weights are integer tensors that FSDP and ZeRO cannot shard, and DeepSpeed's engine with them is "
                "untested); use model.quantization: 4bit (QLoRA shards under fsdp) or training.distributed: ddp"]
    if quant == "4bit" and strategy == "deepspeed_zero3":
        return ["training.distributed: 'deepspeed_zero3' with model.quantization: '4bit' is not supported (ZeRO-3 "
                "would have to build the 4-bit model inside deepspeed.zero.Init, which h1tune does not do); use "
                "training.distributed: fsdp (QLoRA with FSDP2) or deepspeed_zero2"]
    return []


def grpo_checks(cfg: H1tuneConfig) -> list[str]:
    """Rewards belong to grpo and grpo needs them; each reward names exactly one source; the batch holds
    whole groups."""
    t, problems = cfg.training, []
    if t.objective != "grpo":
        if t.rewards:
            problems.append("training.rewards: applies to objective grpo; set training.objective: grpo or remove them")
        if t.beta == 0:
            problems.append(f"training.beta: must be > 0 for objective {t.objective}")
        if t.rollouts != "transformers":
            problems.append("training.rollouts: applies to objective grpo (who generates its completions); remove it")
        return problems
    if not t.rewards:
        problems.append("training.rewards: objective grpo needs at least one reward, e.g. [{name: math_answer}] "
                        f"(built-ins: {', '.join(BUILTIN_NAMES)}) or [{{function: my_rewards.py:score}}]")
    for i, reward in enumerate(t.rewards):
        where = f"training.rewards[{i}]"
        if (reward.name is None) == (reward.function is None):
            problems.append(f"{where}: give exactly one of `name` (a built-in: {', '.join(BUILTIN_NAMES)}) or "
                            "`function` ('path/to/rewards.py:score')")
        elif reward.name is not None and reward.name not in BUILTIN_NAMES:
            problems.append(f"{where}.name: unknown reward {reward.name!r}; built-ins: {', '.join(BUILTIN_NAMES)}; "
                            "a function of your own goes in `function: path/to/rewards.py:name`")
        if reward.target is not None and reward.name != "length":
            problems.append(f"{where}.target: only the `length` reward takes a target")
    if cfg.model.adapter and t.beta:
        problems.append("training.beta: with model.adapter, GRPO's reference would be the base, not the starting "
                        "adapter; merge it first (h1tune merge ADAPTER OUT, then model.name_or_path: OUT) or set "
                        "training.beta: 0 (no reference)")
    batch = t.per_device_train_batch_size * t.gradient_accumulation_steps
    if batch % t.num_generations:
        problems.append(f"training.per_device_train_batch_size x gradient_accumulation_steps ({batch}) must be a "
                        f"multiple of training.num_generations ({t.num_generations}): each step trains whole groups "
                        "of completions of one prompt")
    return problems
