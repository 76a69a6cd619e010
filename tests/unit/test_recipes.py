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
