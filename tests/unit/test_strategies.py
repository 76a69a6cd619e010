"""training.distributed: refused combinations say why; the shipped accelerate / DeepSpeed files say
what the docs claim (FSDP2 per FalconH1DecoderLayer, sharded checkpoints, ZeRO-2/3 with the Trainer's
own optimiser and schedule) and reach TrainingArguments intact; QLoRA under FSDP stores its 4-bit
weights in the compute dtype; the files ship in the wheel."""

import fnmatch
import json
import tomllib
from pathlib import Path

import pytest
import torch
import yaml

from h1tune.config import config_from_dict
from h1tune.errors import ConfigError
from h1tune.model import quantization_config
from h1tune.policy import DECODER_LAYER_CLASS
from h1tune.train.arguments import trainer_kwargs
from h1tune.train.strategies import (ACCELERATE_FILES, DEEPSPEED_FILES, STRATEGIES, accelerate_config,
                                     deepspeed_config, resource, shards_4bit_weights, trainer_overrides)

ROOT = Path(__file__).resolve().parents[2]


def config(strategy: str, quantization: str = "none", **training):
    return config_from_dict({"model": {"quantization": quantization},
                             "training": {"distributed": strategy, **training}})


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_8bit_is_refused_with_every_sharding_strategy(strategy):
    with pytest.raises(ConfigError) as err:
        config(strategy, "8bit")
    assert f"training.distributed: {strategy!r} cannot run model.quantization: '8bit'" in str(err.value)
    assert "use model.quantization: 4bit" in str(err.value)


def test_qlora_under_zero3_is_refused_and_the_working_pairs_pass():
    with pytest.raises(ConfigError, match="'deepspeed_zero3' with model.quantization: '4bit' is not supported.*fsdp"):
        config("deepspeed_zero3", "4bit")
    for strategy, quantization in [("fsdp", "4bit"), ("deepspeed_zero2", "4bit"), ("ddp", "8bit"),
                                   ("deepspeed_zero3", "none"), ("none", "8bit")]:
        assert config(strategy, quantization).training.distributed == strategy


def test_an_unknown_strategy_lists_the_choices():
    with pytest.raises(ConfigError, match="training.distributed: must be one of .*'fsdp'.*got 'zero3'"):
        config("zero3")


def test_fsdp_config_wraps_the_decoder_layer_transformers_keeps_whole():
    from transformers import FalconH1ForCausalLM
    from transformers.models.falcon_h1 import modeling_falcon_h1

    section = yaml.safe_load(accelerate_config("fsdp").read_text())["fsdp_config"]
    assert section["fsdp_transformer_layer_cls_to_wrap"] == DECODER_LAYER_CLASS
    assert FalconH1ForCausalLM._no_split_modules == [DECODER_LAYER_CLASS]
    assert hasattr(modeling_falcon_h1, DECODER_LAYER_CLASS)
    assert section["fsdp_version"] == 2 and section["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"


@pytest.mark.parametrize("checkpointing", [True, False])
def test_fsdp_reaches_training_arguments_with_fsdp_checkpointing_instead_of_the_models(tmp_path, checkpointing):
    """The same settings under torchrun, which sets no accelerate environment: TrainingArguments carry them."""
    from transformers import TrainingArguments

    cfg = config("fsdp", gradient_checkpointing=checkpointing, max_steps=1)
    kwargs, _ = trainer_kwargs(cfg, batch_tokens=1024, has_eval=False)
    assert kwargs["gradient_checkpointing"] is False  # FSDP's own, or each layer is gathered twice in backward
    args = TrainingArguments(**{**kwargs, "output_dir": str(tmp_path), "report_to": []})
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["transformer_cls_names_to_wrap"] == DECODER_LAYER_CLASS
    assert plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert plugin["state_dict_type"] == "SHARDED_STATE_DICT" and plugin["reshard_after_forward"] is True
    assert plugin["activation_checkpointing"] is checkpointing
    from accelerate.utils import FullyShardedDataParallelPlugin  # what the Trainer builds from them

    built = FullyShardedDataParallelPlugin(**plugin)
    assert built.transformer_cls_names_to_wrap == [DECODER_LAYER_CLASS]
    assert "SHARDED_STATE_DICT" in str(built.state_dict_type)


@pytest.mark.parametrize("strategy, stage", [("deepspeed_zero2", 2), ("deepspeed_zero3", 3)])
def test_deepspeed_json_leaves_optimiser_and_schedule_to_the_trainer(strategy, stage):
    """No optimizer/scheduler section: the Trainer builds h1tune's (WSD-exponential included); batch
    sizes, clipping and precision are "auto", filled from TrainingArguments."""
    ds = json.loads(deepspeed_config(strategy).read_text())
    assert ds["zero_optimization"]["stage"] == stage
    assert "optimizer" not in ds and "scheduler" not in ds
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert ds[key] == "auto"
    assert ds["bf16"]["enabled"] == "auto" and ds["fp16"]["enabled"] == "auto"
    if stage == 3:  # final/ needs the full 16-bit weights gathered from the partitions
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert trainer_overrides(config(strategy).training) == {"deepspeed": str(deepspeed_config(strategy))}


def test_ddp_and_none_change_no_training_argument():
    assert trainer_overrides(config("ddp").training) == {} == trainer_overrides(config("none").training)


def test_qlora_under_fsdp_stores_4bit_weights_in_the_compute_dtype():
    sharded = config("fsdp", "4bit")
    assert shards_4bit_weights(sharded) and not shards_4bit_weights(config("ddp", "4bit"))
    bnb = quantization_config(sharded.model, torch.bfloat16, shard_4bit=True)
    assert bnb.bnb_4bit_quant_storage == torch.bfloat16 and bnb.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config(sharded.model, torch.bfloat16).bnb_4bit_quant_storage == torch.uint8


def test_every_shipped_file_exists_and_is_package_data():
    names = set(ACCELERATE_FILES.values()) | set(DEEPSPEED_FILES.values())
    assert set(ACCELERATE_FILES) == set(STRATEGIES)
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["h1tune"]
    for name in names:
        path = resource(name)
        assert path.is_file(), path
        relative = path.relative_to(ROOT / "src" / "h1tune").as_posix()
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), f"{relative} not in package-data {patterns}"
