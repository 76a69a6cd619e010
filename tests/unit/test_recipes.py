"""Optimiser presets: TII's batch-scaled LR and WSD-exponential schedule; overrides win."""

import math

import pytest

from h1tune.config import load_config
from h1tune.train.recipes import resolve_optimisation, tii_learning_rate, wsd_exponential_factor


def test_tii_learning_rate_follows_the_square_root_batch_rule():
    assert tii_learning_rate(1_000_000) == pytest.approx(128e-6)
    assert tii_learning_rate(250_000) == pytest.approx(64e-6)


def test_wsd_exponential_warms_up_holds_then_decays_to_an_eighth():
    total, warmup = 100, 10
    factors = [wsd_exponential_factor(s, warmup, total) for s in range(total + 1)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(f == 1.0 for f in factors[10:50])
    assert all(a > b for a, b in zip(factors[50:], factors[51:]))
    assert factors[100] == pytest.approx(1 / 8)
    assert factors[75] == pytest.approx(math.sqrt(1 / 8))


def test_recipe_defaults_by_method_and_overrides_win():
    full = resolve_optimisation(load_config(None, ["adapter.method=full"]), batch_tokens=1_000_000)
    assert full["recipe"] == "tii_sft" and full["learning_rate"] == pytest.approx(128e-6)
    assert (full["adam_beta1"], full["adam_beta2"], full["weight_decay"]) == (0.9, 0.95, 0.0)
    lora = resolve_optimisation(load_config(None), batch_tokens=8192)
    assert lora["recipe"] == "lora" and lora["learning_rate"] == 2e-4 and lora["lr_scheduler_type"] == "cosine"
    custom = resolve_optimisation(load_config(None, ["training.recipe=tii_sft", "training.learning_rate=1e-5",
                                                     "training.adam_beta2=0.99"]), batch_tokens=8192)
    assert custom["learning_rate"] == 1e-5 and custom["adam_beta2"] == 0.99 and custom["adam_beta1"] == 0.9


def test_the_grpo_recipe_is_trls_own_defaults():
    """`grpo` claims to be what TRL's GRPOTrainer does without settings: checked against the installed TRL."""
    import dataclasses

    from trl import GRPOConfig

    trl = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    ours = resolve_optimisation(load_config(None, ["training.objective=grpo", "training.rewards=[{name: length}]"]), 1)
    assert ours["recipe"] == "grpo"
    for name in ("learning_rate", "lr_scheduler_type", "weight_decay", "adam_beta1", "adam_beta2", "beta"):
        assert ours[name] == trl[name], name
    assert ours["loss_type"] == [trl["loss_type"]] and ours["warmup_ratio"] == 0.0 and trl["warmup_steps"] == 0
    assert ours["epsilon_high"] is trl["epsilon_high"] is None and ours["mask_truncated_completions"] is False


def test_h1r_grpo_reaches_trls_config_with_clip_higher_and_masked_truncation():
    from h1tune.train.arguments import trainer_kwargs
    from h1tune.train.grpo import grpo_arguments

    cfg = load_config(None, ["training.objective=grpo", "training.recipe=h1r_grpo", "training.rewards=[{name: length}]",
                             "training.per_device_train_batch_size=8", "training.report_to=[none]"])
    args = grpo_arguments(cfg, *trainer_kwargs(cfg, 1000, has_eval=False))
    assert (args.learning_rate, args.lr_scheduler_type.value, args.beta, args.loss_type) == (1e-6, "constant", 0.0, "dapo")
    assert (args.epsilon, args.epsilon_high, args.mask_truncated_completions) == (0.2, 0.28, True)
