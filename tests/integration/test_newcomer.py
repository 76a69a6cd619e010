"""A newcomer's first hour (issue 17): no silent misreads, no debris from failed runs, one rule for
paths, a saved config that reruns from anywhere, and errors that say what to change."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from h1tune.cli import main

ROW = {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]}


@pytest.fixture()
def project(tmp_path, tiny_dir):
    """A user's project folder: data and a config that uses paths relative to the config file."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text((json.dumps(ROW) + "\n") * 8)
    config = {"model": {"name_or_path": str(tiny_dir)}, "data": {"train": "data/train.jsonl", "max_length": 64},
              "training": {"max_steps": 2, "save_steps": 1, "logging_steps": 1, "report_to": ["none"],
                           "per_device_train_batch_size": 4},
              "output_dir": "runs/first"}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def write(project: Path, **changes) -> str:
    config = yaml.safe_load((project / "cfg.yaml").read_text())
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        (config[section] if key else config).__setitem__(key or section, value)
    (project / "cfg.yaml").write_text(yaml.safe_dump(config))
    return str(project / "cfg.yaml")


def test_paths_are_relative_to_the_config_and_the_saved_config_reruns_from_anywhere(project, monkeypatch, capsys):
    elsewhere = project / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", str(project / "cfg.yaml")]) == 0
    run = project / "runs" / "first"  # output_dir relative to the config file, not the cwd
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["train"][0]["path"] == str(project / "data" / "train.jsonl")
    assert saved["output_dir"] == str(run)
    assert saved["training"]["recipe"] == "lora" and saved["training"]["learning_rate"] == 2e-4  # values used
    assert saved["training"]["lr_scheduler_type"] == "cosine"
    monkeypatch.chdir(project.parent)
    capsys.readouterr()
    assert main(["check", str(run / "config.yaml"), "--set", "adapter.probe=false"]) == 0
    assert main(["train", str(run / "config.yaml")]) == 2  # the same run, recognised as finished
    assert "holds a finished run" in capsys.readouterr().err
    adapter = json.loads((run / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == saved["model"]["name_or_path"]


def test_preset_base_is_recorded_by_name_and_a_run_dir_works_as_an_adapter_dir(project, tmp_path, capsys):
    assert main(["train", write(project, model__name_or_path="tiny")]) == 0
    run = project / "runs" / "first"
    assert json.loads((run / "final" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    assert main(["generate", str(run), "--prompt", "Say hello.", "--max-new-tokens", "3"]) == 0
    assert main(["merge", str(run), str(tmp_path / "merged"), "--eval-prompts", str(project / "data" / "train.jsonl")]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()


def test_a_non_falcon_model_is_refused_before_anything_is_written(project, capsys):
    from transformers import GPT2Config

    gpt2 = project / "gpt2"
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(gpt2)
    assert main(["train", write(project, model__name_or_path=str(gpt2))]) == 2
    assert "'gpt2' model" in capsys.readouterr().err
    assert not (project / "runs").exists()


def test_missing_logger_and_trainer_setup_errors_leave_no_run_dir_and_the_rerun_works(project, monkeypatch, capsys):
    from h1tune.train import preflight, trainer

    monkeypatch.setitem(preflight.INTEGRATIONS, "wandb", "h1tune_no_such_module")
    assert main(["train", write(project, training__report_to=["wandb"])]) == 2
    assert "'wandb' is not installed" in capsys.readouterr().err and not (project / "runs").exists()

    def broken_init(self, *args, **kwargs):
        raise ValueError("simulated set-up failure")

    monkeypatch.setattr(trainer.H1Trainer, "__init__", broken_init)
    assert main(["train", write(project, training__report_to=["none"])]) == 2
    err = capsys.readouterr().err
    assert "the trainer could not be set up: ValueError: simulated" in err and "Traceback" not in err
    assert not (project / "runs").exists()
    monkeypatch.undo()
    assert main(["train", str(project / "cfg.yaml")]) == 0


def test_non_empty_output_dir_is_refused_before_the_data_checks_and_overwrite_says_what_it_removes(
        project, caplog, capsys):
    (project / "runs" / "first").mkdir(parents=True)
    (project / "runs" / "first" / "notes.txt").write_text("mine")
    (project / "data" / "train.jsonl").write_text("{broken\n")
    assert main(["train", str(project / "cfg.yaml")]) == 2
    err = capsys.readouterr().err
    assert "is not empty and holds no h1tune run" in err and "train.jsonl" not in err
    (project / "data" / "train.jsonl").write_text((json.dumps(ROW) + "\n") * 8)
    with caplog.at_level(logging.INFO, logger="h1tune"):
        assert main(["train", str(project / "cfg.yaml"), "--overwrite"]) == 0
    assert "--overwrite: removing" in caplog.text and "notes.txt" in caplog.text


def test_ctrl_c_says_how_to_resume_and_resume_takes_a_checkpoint(project, monkeypatch, capsys):
    from transformers import TrainerCallback

    from h1tune.train import run

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    real = run._train
    monkeypatch.setattr(run, "_train", lambda cfg, inputs, claim, callbacks, *rest: real(cfg, inputs, claim, [Interrupt()], *rest))
    config = write(project, training__max_steps=4)
    assert main(["train", config]) == 130
    err = capsys.readouterr().err
    assert "rerun the same command to resume from" in err and "checkpoint-" in err
    monkeypatch.undo()
    assert main(["train", config, "--resume", "checkpoint-1"]) == 0
    assert "resumed from step 1" in capsys.readouterr().out
    assert main(["train", config, "--resume", "checkpoint-9", "--overwrite"]) == 0  # overwrite: a fresh run


def test_resume_names_a_checkpoint_that_does_not_exist(project, capsys):
    config = write(project)
    assert main(["train", config]) == 0
    assert main(["train", config, "--resume", "checkpoint-7"]) == 2
    assert "not a complete checkpoint" in capsys.readouterr().err


def test_model_names_that_are_neither_presets_dirs_nor_hub_ids(project, capsys):
    assert main(["check", write(project, model__name_or_path="tinyy")]) == 2
    assert "did you mean the preset 'tiny'" in capsys.readouterr().err
    assert main(["check", write(project, model__name_or_path="./models/mine")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_generate_with_tools_renders_them(tiny_dir, tmp_path, capsys):
    tools = [{"name": "get_weather", "description": "weather by city", "parameters": {"type": "object"}}]
    (tmp_path / "tools.json").write_text(json.dumps(tools))
    assert main(["generate", str(tiny_dir), "--prompt", "Weather in Paris?", "--max-new-tokens", "2",
                 "--tools", str(tmp_path / "tools.json")]) == 0
    (tmp_path / "bad.json").write_text('[{"description": "no name"}]')
    assert main(["generate", str(tiny_dir), "--prompt", "x", "--tools", str(tmp_path / "bad.json")]) == 2
    assert "has no `name`" in capsys.readouterr().err


def test_tools_reach_the_prompt(tiny_dir):
    from h1tune.config import ModelConfig
    from h1tune.generate import load_for_generation

    _, tokenizer = load_for_generation(ModelConfig(name_or_path=str(tiny_dir)))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tools=[{"name": "get_weather"}],
                                         tokenize=False)
    assert "get_weather" in text
