"""Preference-tuning config: TRL's loss names, the recipes (tii_dpo, dpo, kto) and every contradiction
between objective, recipe, loss, packing and a starting adapter reported at once."""

import dataclasses
import re

import pytest

from h1tune.config import DPO_LOSS_TYPES, KTO_LOSS_TYPES, load_config
from h1tune.errors import ConfigError
from h1tune.train.recipes import resolve_optimisation


def _trl_field(config_class, name):
    return {f.name: f for f in dataclasses.fields(config_class)}[name]


def test_loss_names_are_trls():
    from trl import DPOConfig, KTOConfig

    help_text = _trl_field(DPOConfig, "loss_type").metadata["help"]
    assert set(DPO_LOSS_TYPES) == set(re.findall(r"`'(\w+)'`", help_text))
    assert set(KTO_LOSS_TYPES) == set(_trl_field(KTOConfig, "loss_type").metadata["choices"])


def test_tii_dpo_recipe_is_tiis_dpo_stage():
    opt = resolve_optimisation(load_config(None, ["training.objective=dpo", "training.recipe=tii_dpo"]), 8192)
    assert opt["loss_type"] == ["sigmoid_norm"] and opt["beta"] == 5.0 and opt["learning_rate"] == 5e-6
    assert opt["lr_scheduler_type"] == "linear" and opt["warmup_ratio"] == 0.1
    assert (opt["adam_beta1"], opt["adam_beta2"], opt["weight_decay"]) == (0.9, 0.999, 0.0)
    assert opt["schedule_epochs"] == 2.0  # stopped after num_train_epochs (1)


def test_objective_picks_its_recipe_and_explicit_fields_win():
    dpo = resolve_optimisation(load_config(None, ["training.objective=dpo"]), 8192)
    assert dpo["recipe"] == "dpo" and dpo["loss_type"] == ["sigmoid"] and dpo["beta"] == 0.1
    assert dpo["schedule_epochs"] == 1.0
    kto = resolve_optimisation(load_config(None, ["training.objective=kto", "training.beta=0.3"]), 8192)
    assert kto["recipe"] == "kto" and kto["loss_type"] == ["kto"] and kto["beta"] == 0.3
    custom = resolve_optimisation(load_config(None, ["training.objective=dpo", "training.loss_type=ipo",
                                                     "training.recipe=tii_dpo"]), 8192)
    assert custom["loss_type"] == ["ipo"] and custom["beta"] == 5.0
    assert resolve_optimisation(load_config(None), 8192)["recipe"] == "lora"  # sft unchanged


def test_contradictions_are_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["training.objective=kto", "training.recipe=tii_dpo", "training.loss_type=[kto, sigmoid]",
                           "data.packing=true", "model.adapter=runs/sft/final", "adapter.method=full",
                           "training.per_device_train_batch_size=1"])
    problems = err.value.problems
    assert any("training.recipe: 'tii_dpo' is not a recipe for training.objective 'kto'" in p for p in problems)
    assert any("training.loss_type: 'sigmoid' is not a TRL KTO loss" in p for p in problems)
    assert any(p.startswith("data.packing: not supported with objective kto") for p in problems)
    assert any(p.startswith("model.adapter: continuing a LoRA adapter needs adapter.method: lora") for p in problems)
    assert any(p.startswith("training.per_device_train_batch_size: KTO") for p in problems)
    assert "training.loss_type: KTO takes one loss name" in problems


def test_sft_refuses_preference_only_options():
    with pytest.raises(ConfigError, match="training.beta: applies to objective dpo, kto or grpo"):
        load_config(None, ["training.beta=0.1"])
    with pytest.raises(ConfigError, match="training.recipe: 'dpo' is not a recipe for training.objective 'sft'"):
        load_config(None, ["training.recipe=dpo"])
    with pytest.raises(ConfigError, match="training.schedule_epochs: 0.5 is shorter"):
        load_config(None, ["training.schedule_epochs=0.5"])


def test_preference_formats_can_be_named_on_a_source():
    cfg = load_config(None, ["training.objective=dpo", "data.train=[{path: d.json, format: sharegpt_ranking}]"])
    assert cfg.data.train[0].format == "sharegpt_ranking"
