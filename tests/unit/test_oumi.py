"""OUMI configs: every shared Falcon-H1 recipe loads, maps and reports; the values and reasons are the
right ones; evaluation/inference files get a clear refusal; unknown OUMI fields are errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from h1tune.config import load_config
from h1tune.errors import ConfigError, H1tuneError
from h1tune.oumi import config_kind, convert_file, load_run_config, map_oumi, validate
from h1tune.oumi import schema
from h1tune.oumi.report import IGNORED, MAPPED, NOT_HONOURED, SAFETY
from h1tune.policy import ALWAYS_UNQUANTIZED

RECIPES = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "oumi-recipes-falcon-h1"
needs_recipes = pytest.mark.skipif(not RECIPES.is_dir(), reason=f"OUMI recipes not found at {RECIPES}")
FILES = sorted(str(p.relative_to(RECIPES)) for p in RECIPES.rglob("*.yaml")) if RECIPES.is_dir() else []
SFT_05B = "sft/falcon_h1_0_5b/full_train.yaml"
DPO_05B = "dpo/falcon_h1_0_5b/qlora_dpo.yaml"


def recipe(name: str) -> dict:
    return yaml.safe_load((RECIPES / name).read_text())


def mapped(tree: dict, *overrides: str):
    out, report, sections = map_oumi(copy.deepcopy(tree), "test.yaml")
    return validate(out, report, list(overrides)), report


def leaf_fields(tree: dict) -> list[str]:
    """The OUMI fields a training file sets: section.key, and data.SPLIT.key / data.SPLIT.datasets.I.key."""
    fields = []
    for section, values in tree.items():
        if section != "data":
            fields += [f"{section}.{key}" for key in values or {}]
            continue
        for split, split_values in (values or {}).items():
            for key, value in split_values.items():
                if key == "datasets":
                    fields += [f"data.{split}.datasets.{i}.{k}" for i, d in enumerate(value) for k in d]
                else:
                    fields.append(f"data.{split}.{key}")
    return fields


@needs_recipes
def test_the_shared_folder_has_every_kind_of_recipe():
    kinds = [config_kind(recipe(f)) for f in FILES]
    assert kinds.count("training") == 7 and kinds.count("evaluation") == 6 and kinds.count("inference") == 6, FILES


@needs_recipes
@pytest.mark.parametrize("name", FILES)
def test_every_recipe_loads_maps_and_reports(name):
    tree = recipe(name)
    if config_kind(tree) != "training":
        with pytest.raises(H1tuneError) as info:
            convert_file(RECIPES / name)
        text = str(info.value)
        assert "not a training config" in text and tree["model"]["model_name"] in text
        assert ("h1tune eval" if config_kind(tree) == "evaluation" else "h1tune chat") in text
        return
    cfg, report = convert_file(RECIPES / name)
    assert cfg.model.name_or_path == tree["model"]["model_name"]
    missing = [f for f in leaf_fields(tree) if report.find(f) is None]
    assert not missing, f"fields without a report entry: {missing}"
    for entry in report.entries:
        assert entry.kind in (MAPPED, SAFETY) or entry.reason, f"{entry.oumi} is {entry.kind} without a reason"
    text = report.format()
    assert text.count("\n") >= len(report.entries) and "mapped:" in text


@needs_recipes
def test_sft_recipe_maps_its_values_and_oumi_defaults():
    cfg, report = mapped(recipe(SFT_05B))
    assert (cfg.training.objective, cfg.adapter.method, cfg.model.dtype) == ("sft", "full", "bfloat16")
    assert cfg.training.learning_rate == pytest.approx(32e-6)
    assert (cfg.training.save_steps, cfg.training.logging_steps, cfg.data.max_length) == (800, 100, 2048)
    # what the file leaves out runs at OUMI's defaults, not h1tune's recipe
    assert (cfg.training.num_train_epochs, cfg.training.per_device_train_batch_size) == (3, 8)
    training = cfg.training
    assert (training.lr_scheduler_type, training.warmup_ratio, training.adam_beta2) == ("linear", 0.0, 0.999)
    assert report.find("training.num_train_epochs").default and not report.find("training.learning_rate").default
    assert cfg.data.assistant_only_loss is False, "OUMI's default collator trains on every token"
    liger = report.find("model.enable_liger_kernel")
    assert liger.kind == NOT_HONOURED and "liger-kernel" in liger.reason and "not an h1tune dependency" in liger.reason
    assert report.find("training.enable_wandb").kind == NOT_HONOURED
    assert report.find("training.dataloader_num_workers").kind == IGNORED
    assert report.find("training.optimizer").kind == MAPPED  # adamw_torch_fused is h1tune's AdamW
    assert "system prompt" in report.find("data.train.datasets.0.dataset_name (rows)").reason


@needs_recipes
def test_dpo_recipe_maps_qlora_and_keeps_both_unquantized_modules():
    cfg, report = mapped(recipe(DPO_05B))
    assert (cfg.training.objective, cfg.adapter.method, cfg.model.quantization) == ("dpo", "lora", "4bit")
    assert (cfg.adapter.r, cfg.adapter.lora_alpha, cfg.adapter.lora_dropout) == (16, 32, 0.0)
    assert cfg.adapter.target_modules == recipe(DPO_05B)["peft"]["lora_target_modules"]
    assert (cfg.training.beta, cfg.training.loss_type, cfg.training.learning_rate) == (0.1, ["sigmoid"], 5e-05)
    skip = report.find("peft.llm_int8_skip_modules")
    assert skip.kind == SAFETY and skip.value == ["out_proj"] and cfg.model.llm_int8_skip_modules == []
    assert all(m in skip.reason for m in ALWAYS_UNQUANTIZED) and "would quantize lm_head" in skip.reason
    assert report.find("peft.use_bnb_nested_quant").kind == NOT_HONOURED  # OUMI default false; h1tune nests
    assert report.find("peft.bnb_4bit_quant_storage").kind == NOT_HONOURED
    assert report.find("peft.bnb_4bit_quant_type").kind == MAPPED
    assert report.find("model.shard_for_eval").kind == IGNORED


def test_a_complete_skip_list_is_mapped_with_its_extras():
    tree = {"model": {"model_name": "m"}, "training": {"use_peft": True},
            "peft": {"q_lora": True, "llm_int8_skip_modules": [*ALWAYS_UNQUANTIZED, "gate_proj"]}}
    cfg, report = mapped(tree)
    assert report.find("peft.llm_int8_skip_modules").kind == MAPPED and cfg.model.llm_int8_skip_modules == ["gate_proj"]
    assert report.find("peft.bnb_4bit_quant_type").kind == NOT_HONOURED, "OUMI's fp4 default is not h1tune's NF4"


@needs_recipes
def test_fsdp_sections_map_onto_the_fsdp_strategy():
    cfg, report = mapped(recipe("sft/falcon_h1_34b/full_train.yaml"))
    assert cfg.training.distributed == "fsdp" and cfg.training.gradient_checkpointing is True
    assert report.find("fsdp.cpu_offload").kind == NOT_HONOURED and "offload" in report.find("fsdp.cpu_offload").reason
    assert report.find("fsdp.state_dict_type").kind == MAPPED
    cfg, report = mapped(recipe("sft/falcon_h1_7b/full_train.yaml"))
    assert report.find("fsdp.sharding_strategy").kind == MAPPED and report.find("fsdp.forward_prefetch").kind == IGNORED
    cfg, _ = mapped(recipe(SFT_05B))
    assert cfg.training.distributed == "none"


def test_deepspeed_stage_selects_the_zero_strategy():
    tree = {"model": {"model_name": "m"}, "deepspeed": {"enable_deepspeed": True, "zero_stage": "ZERO_3",
                                                         "offload_param": {"device": "cpu"}, "overlap_comm": True}}
    cfg, report = mapped(tree)
    assert cfg.training.distributed == "deepspeed_zero3"
    assert report.find("deepspeed.offload_param").kind == NOT_HONOURED
    assert report.find("deepspeed.overlap_comm").kind == IGNORED


@needs_recipes
def test_unknown_oumi_fields_are_errors_with_the_valid_keys():
    tree = recipe(DPO_05B)
    tree["training"]["learning_rat"] = 1e-4
    tree["peft"]["lora_rank"] = 8
    tree["data"]["train"]["datasets"][0]["path"] = "x.jsonl"
    tree["adapter"] = {"r": 8}
    with pytest.raises(ConfigError) as info:
        mapped(tree)
    problems = info.value.problems
    assert len(problems) == 4, problems
    assert any("training.learning_rat" in p and "did you mean 'learning_rate'" in p for p in problems)
    assert any("peft.lora_rank" in p and "PeftParams" in p for p in problems)
    assert any("data.train.datasets.0.path" in p and "DatasetParams" in p for p in problems)
    assert any(p.startswith("test.yaml: adapter:") and "TrainingConfig" in p for p in problems)


def test_a_training_config_without_model_name_is_refused():
    with pytest.raises(ConfigError, match="model.model_name: required"):
        mapped({"data": {"train": {"datasets": [{"dataset_name": "org/d"}]}}, "training": {"learning_rate": 1e-4}})


def test_trainers_h1tune_lacks_are_refused():
    with pytest.raises(ConfigError, match="TRL_GRPO is not supported by h1tune"):
        mapped({"model": {"model_name": "m"}, "training": {"trainer_type": "TRL_GRPO"}})
    cfg, _ = mapped({"model": {"model_name": "m"}, "training": {"trainer_type": "trl_kto"}})
    assert cfg.training.objective == "kto" and cfg.training.loss_type == ["kto"]


@needs_recipes
def test_overrides_apply_after_mapping_and_errors_name_the_oumi_field():
    cfg, report = mapped(recipe(DPO_05B), "model.name_or_path=tiny", "data.train=local.jsonl", "training.max_steps=2")
    assert (cfg.model.name_or_path, cfg.data.train[0].path, cfg.training.max_steps) == ("tiny", "local.jsonl", 2)
    assert cfg.adapter.r == 16 and report.overrides[0] == "model.name_or_path=tiny"
    tree = recipe(DPO_05B)
    tree["peft"]["lora_target_modules"] = ["q_proj", "conv1d"]
    with pytest.raises(ConfigError) as info:
        mapped(tree)
    assert any("conv1d" in p and "from OUMI peft.lora_target_modules" in p for p in info.value.problems)


def test_every_oumi_schema_field_has_a_rule():
    """Mapping a config that switches every section on consults every field OUMI's schema has."""
    split = {"datasets": [{"dataset_name": "d", "mixture_proportion": 1.0}], "collator_name": "text_with_padding"}
    base = {"model": {"model_name": "m"}, "data": {"train": split, "validation": copy.deepcopy(split)},
            "training": {"use_peft": True, "eval_strategy": "steps"}, "peft": {"q_lora": True}}
    consulted: dict[str, set] = {}
    for extra in ({"fsdp": {"enable_fsdp": True}}, {"deepspeed": {"enable_deepspeed": True, "zero_stage": "2"}}):
        _, _, sections = map_oumi({**copy.deepcopy(base), **extra}, "t.yaml")
        for sec in sections:
            name = sec.prefix.split(".")[0] if sec.prefix.count(".") == 1 else (
                "dataset" if "datasets" in sec.prefix else "split")
            consulted.setdefault(name, set()).update(sec.consulted)
    expected = {"model": schema.MODEL, "training": schema.TRAINING, "peft": schema.PEFT, "fsdp": schema.FSDP,
                "deepspeed": schema.DEEPSPEED, "data": schema.DATA, "split": schema.SPLIT, "dataset": schema.DATASET}
    for name, fields in expected.items():
        assert set(fields) <= consulted[name], f"{name}: no rule for {sorted(set(fields) - consulted[name])}"


def test_h1tune_configs_load_as_before_without_a_report(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model: {name_or_path: tiny}\ntraining: {learning_rate: 1.0e-4}\n")
    assert config_kind(yaml.safe_load(path.read_text())) is None
    assert load_run_config(path, ["training.max_steps=3"]) == load_config(path, ["training.max_steps=3"])
    assert capsys.readouterr().out == ""


@needs_recipes
def test_the_report_is_printed_once_by_the_main_process(monkeypatch, capsys):
    cfg = load_run_config(RECIPES / SFT_05B, ["model.name_or_path=tiny"])
    assert cfg.model.name_or_path == "tiny" and "OUMI training config" in capsys.readouterr().out
    monkeypatch.setenv("RANK", "1")
    assert load_run_config(RECIPES / SFT_05B, ["model.name_or_path=tiny"]) == cfg
    assert capsys.readouterr().out == ""


@needs_recipes
def test_convert_config_writes_a_config_that_loads_to_the_same_run(tmp_path, capsys):
    from h1tune.cli import main

    out = tmp_path / "h1.yaml"
    assert main(["convert-config", str(RECIPES / DPO_05B), "-o", str(out), "--set", "data.train=x.jsonl"]) == 0
    text = out.read_text()
    assert text.startswith("# h1tune config converted from OUMI") and "# " + "  NOT honoured" in text
    expected, _ = convert_file(RECIPES / DPO_05B, ["data.train=x.jsonl"])
    loaded = load_config(out)
    # OUMI's relative paths are relative to the current directory, h1tune's YAML to its folder: same places
    assert Path(loaded.output_dir).resolve() == (Path.cwd() / expected.output_dir).resolve()
    assert Path(loaded.data.train[0].path).resolve() == (Path.cwd() / "x.jsonl").resolve()
    loaded.output_dir, loaded.data.train[0].path = expected.output_dir, "x.jsonl"
    assert loaded == expected
    assert "changed by h1tune's guarantees" in capsys.readouterr().err
    assert main(["convert-config", str(RECIPES / DPO_05B), "-o", str(out)]) == 2, "an existing file needs --overwrite"
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == text


@needs_recipes
@pytest.mark.parametrize("command", ["train", "check", "convert-config"])
def test_cli_refuses_evaluation_and_inference_configs(command, capsys):
    from h1tune.cli import main

    for name in ("evaluation/falcon_h1_0_5b/eval.yaml", "inference/0_5b_infer.yaml"):
        assert main([command, str(RECIPES / name)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and "not a training config" in err and "Traceback" not in err


def test_data_and_loop_fields_map_or_say_why_not():
    tree = {
        "model": {"model_name": "m", "model_max_length": 512},
        "data": {
            "train": {"datasets": [{"dataset_name": "text_sft", "dataset_path": "a.jsonl", "mixture_proportion": 0.7},
                                   {"dataset_name": "org/b", "split": "dev", "mixture_proportion": 0.3}],
                      "collator_name": "text_completions_only_with_padding", "pack": True},
            "validation": {"datasets": [{"dataset_name": "text_sft", "dataset_path": "v.jsonl"}]},
        },
        "training": {"trainer_type": "TRL_DPO", "eval_strategy": "steps", "eval_steps": 7, "warmup_steps": 10,
                     "optimizer": "sgd", "max_grad_norm": None,
                     "trainer_kwargs": {"beta": 0.5, "loss_type": "ipo", "rpo_alpha": 1.0}},
    }
    cfg, report = mapped(tree)
    assert [(s.path, s.split) for s in cfg.data.train] == [("a.jsonl", "train"), ("org/b", "dev")]
    assert [s.path for s in cfg.data.eval] == ["v.jsonl"] and cfg.training.eval_steps == 7
    assert cfg.data.packing is True and cfg.data.max_length == 512 and cfg.training.max_grad_norm == 0.0
    assert (cfg.training.beta, cfg.training.loss_type) == (0.5, ["ipo"])
    assert [s.weight for s in cfg.data.train] == [1.0, 1.0], "probabilities are not weights"
    assert report.find("data.train.mixture_strategy").kind == NOT_HONOURED
    assert "[0.7, 0.3]" in report.find("data.train.mixture_strategy").reason
    for field in ("training.warmup_steps", "training.optimizer", "training.trainer_kwargs.rpo_alpha"):
        assert report.find(field).kind == NOT_HONOURED, field
    assert report.find("data.train.datasets.0.dataset_name").kind == IGNORED  # the loader class of dataset_path
    assert "preference batches" in report.find("data.train.collator_name").reason  # dpo builds its own batches
    sft = copy.deepcopy(tree)
    sft["training"] = {"trainer_type": "TRL_SFT"}
    cfg, report = mapped(sft)
    assert cfg.data.assistant_only_loss is True and report.find("data.train.collator_name").kind == MAPPED
