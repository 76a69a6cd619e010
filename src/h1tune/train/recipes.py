"""Optimiser and schedule presets, named after their source; every field can be overridden.

- `tii_sft`: Falcon-H1's own SFT recipe (docs/post_training_details.md): AdamW β=(0.9, 0.95), no
  weight decay, warmup-stable-decay with an exponential decay to η/8 over the last half, and peak
  η = 128e-6 * sqrt(batch_tokens / 1M) ("Adam batch scaling"; μP needs no per-layer rates).
- `lora`: a conventional LoRA recipe: 2e-4, cosine, 3% warmup, no weight decay.
- `tii_dpo`: Falcon-H1's DPO stage: TRL's `sigmoid_norm` (length-normalised DPO, TII's `dpo_norm`),
  β=5, η=5e-6, AdamW (0.9, 0.999), linear decay to zero over a 2-epoch schedule with 10% warmup,
  stopped after `num_train_epochs` (1): TII found stopping at about one epoch worked best.
- `dpo`: conventional DPO: sigmoid loss, β=0.1, 5e-6, cosine, 10% warmup (the alignment handbook's
  LoRA setting). `kto`: TRL's KTO loss with the same optimiser settings.
- `grpo`: TRL 1.16's GRPOConfig defaults, as its `GRPOTrainer` runs without settings: the `dapo` loss
  (token-level normalisation, clip 0.2), no KL term (β=0: no reference forward; set training.beta for one,
  the base with the adapter disabled), AdamW (0.9, 0.999), 1e-6 decaying linearly, no warmup.
- `h1r_grpo`: the RL stage of Falcon-H1R's SFT-then-RL path. What the paper (arXiv 2601.02346) says that
  could be read offline (its abstract and published summaries; the RL section itself could not): GRPO-family
  RL with verifiable rewards on data disjoint from the SFT set, after a cold-start SFT on long traces. Its
  numbers (learning rate, clip, KL, group size, lengths) were not readable, so every value here is DAPO's
  published setting for long reasoning traces (Yu et al. 2025, arXiv 2503.14476), labelled as such and not
  as TII's: a constant 1e-6, no KL term, the token-level `dapo` loss, clip-higher (ε 0.2 below, 0.28 above),
  truncated completions masked out of the loss (a cut trace carries no verifiable answer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from h1tune.config import H1tuneConfig

TII_PEAK_LR = 128e-6
TII_REF_BATCH_TOKENS = 1_000_000
TII_DECAY_FLOOR = 1 / 8  # exponential decay to η/8
WSD_EXP = "wsd_exponential"  # our scheduler name; HF's warmup_stable_decay has no exponential decay


@dataclass(frozen=True)
class Recipe:
    learning_rate: float | None  # None: computed from the batch size (tii_sft)
    lr_scheduler_type: str
    warmup_ratio: float
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    beta: float | None = None  # dpo/kto
    loss_type: str | None = None  # dpo/kto, TRL's name
    schedule_factor: float = 1.0  # the schedule spans factor * num_train_epochs; training stops at num_train_epochs
    epsilon_high: float | None = None  # grpo: TRL's upper clip (None: the same as the lower, 0.2)
    mask_truncated_completions: bool = False  # grpo: completions cut at max_completion_length leave the loss


RECIPES = {
    "tii_sft": Recipe(None, WSD_EXP, 0.02, 0.0, 0.9, 0.95),
    "lora": Recipe(2e-4, "cosine", 0.03, 0.0, 0.9, 0.999),
    "tii_dpo": Recipe(5e-6, "linear", 0.1, 0.0, 0.9, 0.999, beta=5.0, loss_type="sigmoid_norm", schedule_factor=2.0),
    "dpo": Recipe(5e-6, "cosine", 0.1, 0.0, 0.9, 0.999, beta=0.1, loss_type="sigmoid"),
    "kto": Recipe(5e-6, "cosine", 0.1, 0.0, 0.9, 0.999, beta=0.1, loss_type="kto"),
    "grpo": Recipe(1e-6, "linear", 0.0, 0.0, 0.9, 0.999, beta=0.0, loss_type="dapo"),
    "h1r_grpo": Recipe(1e-6, "constant", 0.0, 0.0, 0.9, 0.999, beta=0.0, loss_type="dapo", epsilon_high=0.28,
                       mask_truncated_completions=True),
}
DEFAULT_RECIPE = {"dpo": "dpo", "kto": "kto", "grpo": "grpo"}  # sft: tii_sft for full fine-tuning, else lora


def tii_learning_rate(batch_tokens: int) -> float:
    """TII's batch-size rule: η(b) = 128e-6 * sqrt(b / 1M tokens)."""
    return TII_PEAK_LR * math.sqrt(batch_tokens / TII_REF_BATCH_TOKENS)


def resolve_optimisation(cfg: H1tuneConfig, batch_tokens: int) -> dict[str, float | str]:
    """The recipe's values with every explicitly set training field taking precedence."""
    t = cfg.training
    name = t.recipe or DEFAULT_RECIPE.get(t.objective) or ("tii_sft" if cfg.adapter.method == "full" else "lora")
    recipe = RECIPES[name]
    lr = t.learning_rate or recipe.learning_rate or tii_learning_rate(batch_tokens)
    return {
        "recipe": name,
        "learning_rate": lr,
        "lr_scheduler_type": t.lr_scheduler_type or recipe.lr_scheduler_type,
        "warmup_ratio": recipe.warmup_ratio if t.warmup_ratio is None else t.warmup_ratio,
        "weight_decay": recipe.weight_decay if t.weight_decay is None else t.weight_decay,
        "adam_beta1": recipe.adam_beta1 if t.adam_beta1 is None else t.adam_beta1,
        "adam_beta2": recipe.adam_beta2 if t.adam_beta2 is None else t.adam_beta2,
        "beta": recipe.beta if t.beta is None else t.beta,
        "loss_type": t.loss_type or ([recipe.loss_type] if recipe.loss_type else None),
        "schedule_epochs": t.schedule_epochs or recipe.schedule_factor * t.num_train_epochs,
        "epsilon_high": recipe.epsilon_high,
        "mask_truncated_completions": recipe.mask_truncated_completions,
    }


def wsd_exponential_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warmup, stable until half-way, then exponential decay to 1/8 at the end."""
    if step < warmup_steps:
        return (step + 1) / max(1, warmup_steps)
    decay_start = max(warmup_steps, total_steps // 2)
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / max(1, total_steps - decay_start)
    return TII_DECAY_FLOOR ** min(1.0, progress)


def build_wsd_exponential(optimizer, warmup_steps: int, total_steps: int):
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, lambda step: wsd_exponential_factor(step, warmup_steps, total_steps))
