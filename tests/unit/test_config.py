"""The typed config: every problem at once with its path, overrides, saved resolved config."""

import subprocess
import sys

import pytest
import yaml

from pathlib import Path

from h1tune.config import H1tuneConfig, absolute_paths, load_config, save_config
from h1tune.errors import ConfigError


def write(tmp_path, tree):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_defaults_are_valid():
    cfg = load_config(None)
    assert cfg.adapter.target_modules == ["attention", "mamba", "mlp"]
    assert cfg.model.dtype == "auto" and cfg.model.trust_remote_code is False


def test_every_problem_reported_at_once_with_paths(tmp_path):
    path = write(tmp_path, {
        "adapter": {"r": 0, "lora_dropout": 1.5, "colour": "red"},
        "training": {"learning_rate": -1, "per_device_train_batch_size": 0},
        "model": {"dtype": "fp8"},
        "bogus": 1,
    })
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert "adapter.r: must be > 0, got 0" in text
    assert "adapter.lora_dropout: must be < 1, got 1.5" in text
    assert "adapter.colour: unknown key" in text
    assert "training.learning_rate: must be > 0, got -1" in text
    assert "training.per_device_train_batch_size: must be > 0, got 0" in text
    assert "model.dtype: must be one of" in text and "'fp8'" in text
    assert "bogus: unknown key" in text
    assert len(info.value.problems) == 7


def test_cross_checks_run_even_when_another_section_is_invalid(tmp_path):
    path = write(tmp_path, {"training": {"learning_rate": 0},
                            "adapter": {"method": "full"}, "model": {"quantization": "4bit"}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert any(p.startswith("training.learning_rate") for p in problems)
    assert any(p.startswith("model.quantization") and "adapter.method: lora" in p for p in problems)


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    path = write(tmp_path, {"training": {"learning_rate": 2e-4}})
    cfg = load_config(path, ["training.learning_rate=1e-4", "data.packing=true", "adapter.target_modules=[attention]"])
    assert cfg.training.learning_rate == 1e-4
    assert cfg.data.packing is True
    assert cfg.adapter.target_modules == ["attention"]
    with pytest.raises(ConfigError) as info:
        load_config(path, ["training.lerning_rate=1", "adapter.r=-2", "nonsense"])
    text = str(info.value)
    assert "training.lerning_rate: unknown key" in text
    assert "adapter.r: must be > 0, got -2" in text
    assert "expected KEY=VALUE" in text


def test_data_sources_accept_shorthand_and_resolve_relative_to_the_file(tmp_path):
    (tmp_path / "train.jsonl").write_text("{}\n")
    path = write(tmp_path, {"data": {"train": ["train.jsonl", {"path": "hub/dataset", "weight": 2}]}})
    cfg = load_config(path)
    assert cfg.data.train[0].path == str(tmp_path / "train.jsonl")
    assert cfg.data.train[1].path == "hub/dataset" and cfg.data.train[1].weight == 2


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name_or_path: tiny\n  dtype: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+"):
        load_config(path)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_save_config_round_trips(tmp_path):
    cfg = load_config(None, ["training.learning_rate=3e-4", "output_dir=somewhere"])
    saved = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(saved)
    assert again == absolute_paths(cfg)  # saved with absolute paths: it means the same from anywhere
    assert again.output_dir == str(Path.cwd() / "somewhere") and again.training.learning_rate == 3e-4


def test_importing_config_does_not_import_torch():
    code = "import sys, h1tune.config as c; c.load_config(None); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unknown_key_suggests_the_closest_valid_one():
    from h1tune.config import config_from_dict

    with pytest.raises(ConfigError) as err:
        config_from_dict({"data": {"max_lenght": 512}, "training": {"learning_rte": 1e-4}})
    text = str(err.value)
    assert "data.max_lenght: unknown key; did you mean 'max_length'?" in text
    assert "training.learning_rte: unknown key; did you mean 'learning_rate'?" in text


@pytest.mark.parametrize("objective", ["sft", "dpo", "kto", "grpo"])
def test_init_config_writes_every_key_and_loads_for_each_objective(objective, tmp_path):
    from h1tune.cli import main

    out = tmp_path / f"{objective}.yaml"
    assert main(["init-config", str(out), "--objective", objective]) == 0
    cfg = load_config(out)
    assert cfg.training.objective == objective
    text = out.read_text()
    for section, field in H1tuneConfig.model_fields.items():
        keys = getattr(field.annotation, "model_fields", {})
        assert all(f"\n  {key}:" in text for key in keys), section
    assert "# one of: none, 4bit, 8bit" in text and "LoRA rank" in text
    assert main(["init-config", str(out)]) == 2  # never overwrites silently


def test_config_reference_doc_is_generated_from_the_schema():
    from pathlib import Path

    from h1tune.config_reference import reference_table

    doc = Path(__file__).resolve().parents[2] / "docs" / "config-reference.md"
    assert doc.read_text() == reference_table(), "regenerate: python -m h1tune.config_reference > docs/config-reference.md"
