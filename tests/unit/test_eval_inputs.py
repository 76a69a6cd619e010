"""`h1tune eval` inputs, checked before any model loads: MODEL arguments, held-out data, prompt files,
task files, and the message when lm-evaluation-harness is not installed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from h1tune.cli import main
from h1tune.config import load_config
from h1tune.errors import DataError, H1tuneError
from h1tune.evaluation import harness, read_prompts, resolve_model
from h1tune.evaluation.loss import read_eval_conversations, tokenize_eval
from h1tune.evaluation.run import eval_data_config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MC_TASK = FIXTURES / "eval_tasks" / "h1tune_mc.yaml"


def write_adapter_dir(path: Path, base: str = "tiny") -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": base,
                                                          "target_modules": ["q_proj"], "r": 8}))
    (path / "adapter_model.safetensors").write_bytes(b"")  # resolving reads the config, never the weights
    return path


def test_a_run_directory_means_its_final_adapter(tmp_path):
    run = tmp_path / "run"
    write_adapter_dir(run / "final")
    (run / "config.yaml").write_text("model: {name_or_path: tiny}\n")
    spec = resolve_model(str(run))
    assert (spec.name, spec.path, spec.kind, spec.base) == (str(run), str(run / "final"), "adapter", "tiny")
    assert resolve_model("tiny").kind == "model" and resolve_model("tiny").path == "tiny"


def test_unusable_model_arguments_say_what_is_wrong(tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("model: {}\n")
    with pytest.raises(H1tuneError, match="has not finished.*checkpoint-N"):
        resolve_model(str(unfinished))
    (tmp_path / "empty").mkdir()
    with pytest.raises(H1tuneError, match="holds no model"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(H1tuneError, match="no such directory"):
        resolve_model(str(tmp_path / "missing"))


def test_prompts_come_from_text_lines_or_any_data_format(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("Hello there\n\n  Count to three.  \n")
    assert [p.messages for p in read_prompts(text)] == [[{"role": "user", "content": "Hello there"}],
                                                         [{"role": "user", "content": "Count to three."}]]
    rows = tmp_path / "p.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Name a colour.", "input": "Be brief."},
        {"instruction": "Add 2 and 2.", "output": "4"},
        {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}]},
    ]))
    first, second, third = read_prompts(rows)
    assert first.messages == [{"role": "user", "content": "Name a colour.\nBe brief."}] and first.reference is None
    assert second.reference == "4" and second.messages[-1]["role"] == "user"
    assert third.reference == "Hello!" and [m["role"] for m in third.messages] == ["system", "user"]


def test_bad_prompt_rows_are_all_reported_with_their_lines(tmp_path):
    rows = tmp_path / "bad.jsonl"
    rows.write_text(json.dumps({"question": "?"}) + "\n" + json.dumps({"prompt": "ok"}) + "\n"
                    + json.dumps({"messages": [{"role": "assistant", "content": "only me"}]}) + "\n")
    with pytest.raises(DataError) as err:
        read_prompts(rows)
    assert "bad.jsonl:1: not a prompt" in str(err.value) and "bad.jsonl:3: has no user turn" in str(err.value)
    with pytest.raises(DataError, match="no such file"):
        read_prompts(tmp_path / "none.txt")


def test_data_flag_replaces_the_configs_eval_set(tmp_path):
    cfg = load_config(None, ["data.eval=a.jsonl", "data.eval_fraction=0.1", "data.packing=true"])
    data = eval_data_config(cfg.data, ["x.jsonl", "y.json"])
    assert [s.path for s in data.eval] == ["x.jsonl", "y.json"] and data.eval_fraction == 0 and data.packing
    assert eval_data_config(cfg.data, []) is cfg.data
    with pytest.raises(DataError, match="--data FILE"):
        read_eval_conversations(load_config(None, []).data, seed=0)


def test_eval_fraction_gives_exactly_the_runs_held_out_examples(tiny_tokenizer):
    from h1tune.data import prepare_datasets

    source = FIXTURES / "data" / "messages.jsonl"
    cfg = load_config(None, [f"data.train={source}", "data.eval_fraction=0.3", "data.max_length=128"])
    conversations = read_eval_conversations(cfg.data, seed=cfg.training.seed)
    examples, dropped = tokenize_eval(conversations, tiny_tokenizer, cfg.data)
    expected = prepare_datasets(cfg.data, tiny_tokenizer, seed=cfg.training.seed).eval
    assert examples == expected and len(examples) > 0 and dropped == 0


def test_task_files_get_data_files_next_to_them(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.chdir(tmp_path)
    name, spec = harness.task_specs(["arc_easy", str(MC_TASK)])
    assert name == "arc_easy"
    data_file = Path(spec["dataset_kwargs"]["data_files"]["test"])
    assert spec["task"] == "h1tune_mc" and data_file.is_absolute() and data_file.is_file()
    with pytest.raises(H1tuneError, match="no such task file"):
        harness.task_specs(["missing_task.yaml"])


def test_harness_metrics_drop_the_none_filter():
    assert harness._metrics({"alias": "x", "acc,none": 1, "acc_stderr,none": 0.5, "exact_match,strict": 0.25,
                             "acc_norm_stderr,none": "N/A"}) == {
        "acc": 1.0, "acc_stderr": 0.5, "exact_match (strict)": 0.25}


def test_without_lm_eval_tasks_say_how_to_install_it(monkeypatch, capsys):
    from h1tune.evaluation import models

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` sees when it is not installed
    with pytest.raises(H1tuneError, match=r"pip install 'h1tune\[eval\]'"):
        harness.require_lm_eval()

    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not load before the inputs are checked")

    monkeypatch.setattr(models, "load_eval_model", no_loading)
    assert main(["eval", "tiny", "--tasks", "arc_easy"]) == 2
    assert "pip install 'h1tune[eval]'" in capsys.readouterr().err


def test_eval_help_names_the_inputs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--data", "--config", "--set", "--output", "--samples", "--tasks", "--chat-template", "run directory"):
        assert flag in text, flag


def test_unknown_task_names_are_refused_before_any_model_loads(monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    from h1tune.evaluation import models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not load before the tasks are checked")

    monkeypatch.setattr(models, "load_eval_model", no_loading)
    assert main(["eval", "tiny", "--tasks", f"arc_easy,no_such_task,{MC_TASK}"]) == 2
    err = capsys.readouterr().err
    assert "unknown task(s) 'no_such_task'" in err and "arc_easy" not in err


def test_preference_files_are_scored_on_their_preferred_completions_only(tiny_tokenizer):
    """Pairs give their chosen completion, KTO files their desirable ones; prompts carry no label."""
    from h1tune.config import DataConfig
    from h1tune.data.preference_prepare import read_preference_source
    from h1tune.data.preference_tokens import encode_pair

    pairs_file = FIXTURES / "data" / "preference_trl.jsonl"
    data_cfg = DataConfig(eval=[str(pairs_file)], max_length=512)
    items = read_eval_conversations(data_cfg, seed=0)
    examples, dropped = tokenize_eval(items, tiny_tokenizer, data_cfg)
    pairs = read_preference_source(data_cfg.eval[0], "dpo").conversations
    assert len(examples) == len(pairs) and dropped == 0
    for example, pair in zip(examples, pairs):
        encoded = encode_pair(pair, tiny_tokenizer, data_cfg)  # DPO training's own tokens
        assert example["input_ids"] == encoded["prompt_ids"] + encoded["chosen_ids"]
        assert [t for t in example["labels"] if t != -100] == encoded["chosen_ids"]

    kto_file = FIXTURES / "data" / "kto_messages.jsonl"
    kto_cfg = DataConfig(eval=[str(kto_file)], max_length=512)
    rows = [json.loads(line) for line in kto_file.read_text().splitlines() if line.strip()]
    kto_items = read_eval_conversations(kto_cfg, seed=0)
    assert len(kto_items) == sum(1 for r in rows if r["label"]) < len(rows)
