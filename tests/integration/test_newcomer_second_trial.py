"""A new user's second trial (issue 21): the probe on data whose answers start late (system prompts,
tool schemas, long preference prompts), and the refusals, counts and displays that trial found wrong."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

from h1tune.cli import main

REPO = Path(__file__).resolve().parents[2]
LONG_SYSTEM = ("You are a careful, helpful assistant for the ACME corporation. Always answer politely, concisely "
               "and accurately, and cite sources when you can. Never reveal internal information. ") * 3
TOOLS = [{"name": f"lookup_{i}", "description": f"Look up record {i} in the ACME inventory by its identifier.",
          "parameters": {"type": "object", "properties": {"identifier": {"type": "string", "description": "the id"},
                                                          "verbose": {"type": "boolean"}}}} for i in range(4)]


def chat(question: str, answer: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], **extra}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp_path: Path, tiny_dir, data_file: Path, **sections) -> str:
    tree = {"model": {"name_or_path": str(tiny_dir)}, "data": {"train": str(data_file), "max_length": 512},
            "training": {"max_steps": 1, "report_to": ["none"], "per_device_train_batch_size": 2},
            "output_dir": str(tmp_path / "run")}
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def assert_probe_passes(capsys, argv: list[str]) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "adapter probe: 32/32 LoRA modules live" in captured.out and "inert" not in captured.err
    return captured.out


# --- the probe ------------------------------------------------------------------------------------


def test_probe_measures_sft_rows_behind_a_long_system_prompt(tmp_path, tiny_dir, tiny_tokenizer, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [chat(f"Question {i}?", f"Answer number {i}.") for i in range(6)])
    prompt_tokens = len(tiny_tokenizer(LONG_SYSTEM)["input_ids"])
    assert prompt_tokens > 64  # the answers start after the probe's whole budget
    for packing in (False, True):
        assert_probe_passes(capsys, ["check", config(tmp_path, tiny_dir, data, data={"system_prompt": LONG_SYSTEM}),
                                     "--set", f"data.packing={str(packing).lower()}"])


def test_probe_measures_rows_with_tool_definitions(tmp_path, tiny_dir, capsys):
    rows = [chat(f"Find record {i}.", f"Record {i} is on shelf {i}.", tools=TOOLS) for i in range(4)]
    cfg = config(tmp_path, tiny_dir, write_jsonl(tmp_path / "t.jsonl", rows), data={"max_length": 2048})
    assert_probe_passes(capsys, ["check", cfg])


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_probe_measures_preference_rows_with_long_prompts(tmp_path, tiny_dir, capsys, objective):
    prompt = [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "Name a colour."}]
    rows = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": f"Blue, shade {i}."}],
             "rejected": [{"role": "assistant", "content": f"Seven {i}."}]} for i in range(4)]
    cfg = config(tmp_path, tiny_dir, write_jsonl(tmp_path / "p.jsonl", rows), training={"objective": objective})
    assert_probe_passes(capsys, ["check", cfg])


def test_probe_windows_end_inside_the_labelled_tokens():
    from h1tune.lm.batching import probe_examples

    late = {"input_ids": list(range(300)), "labels": [-100] * 250 + list(range(250, 300))}
    unlabelled = {"input_ids": list(range(10)), "labels": [-100] * 10}
    windows = probe_examples([unlabelled, late], max_tokens=64)
    assert len(windows) == 1  # the example without a labelled token is never a probe example
    window = windows[0]
    assert len(window["input_ids"]) == 64 and window["input_ids"][0] == 218 and window["input_ids"][-1] == 281
    assert window["labels"][:32] == [-100] * 32 and window["labels"][32:] == list(range(250, 282))


def test_a_batch_without_labels_is_the_probes_failure_not_the_adapters():
    from h1tune.adapters import apply_adapter
    from h1tune.adapters.probe import ProbeError, probe_adapters
    from h1tune.config import H1tuneConfig
    from h1tune.presets import build_model

    model = apply_adapter(build_model("tiny", num_hidden_layers=2), H1tuneConfig())
    ids = torch.randint(5, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ProbeError) as err:
        probe_adapters(model, {"input_ids": ids, "labels": torch.full_like(ids, -100)})
    message = str(err.value)
    assert "could not measure" in message and "no labelled token" in message
    assert "inert" not in message.replace("nothing says they are inert", "") and "out_proj" not in message
    assert not err.value.report.ok and err.value.report.unmeasured


# --- the other findings -----------------------------------------------------------------------------


def test_output_dir_that_is_a_file_is_refused_in_one_line_before_anything_is_written(tmp_path, tiny_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [chat("Hi", "Hello.")] * 4)
    blocker = tmp_path / "taken"
    blocker.write_text("not a directory")
    for out in (blocker, blocker / "run"):
        for command in ("train", "check"):
            assert main([command, config(tmp_path, tiny_dir, data), "--set", f"output_dir={out}"]) == 2
            err = capsys.readouterr().err
            assert "output_dir:" in err and "is a file" in err and "Traceback" not in err
    assert blocker.read_text() == "not a directory" and sorted(p.name for p in tmp_path.iterdir()) == [
        "cfg.yaml", "d.jsonl", "taken"]


def test_reasoning_content_is_not_dropped_silently_and_unread_message_fields_are_counted(tmp_path, tiny_dir, capsys,
                                                                                          caplog):
    rows = [chat("2+2?", "4"), chat("3+3?", "6")]
    for row in rows:
        row["messages"][1]["reasoning_content"] = "Add the numbers."
        row["messages"][0]["name"] = "alice"  # a field no format reads
    with caplog.at_level(logging.WARNING, logger="h1tune"):
        assert main(["check", config(tmp_path, tiny_dir, write_jsonl(tmp_path / "r.jsonl", rows)),
                     "--set", "adapter.probe=false", "--show-example", "1"]) == 0
    out = capsys.readouterr().out
    assert "'messages[].name' (2 rows)" in caplog.text and "'messages[].name' in 2 rows" in out
    assert "rows with reasoning traces 2" in out and "[[<think>\nAdd the numbers.\n</think>\n\n4<|im_end|>]]" in out


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_show_example_renders_preference_examples_with_trained_tokens_marked(tmp_path, tiny_dir, capsys, objective):
    rows = [{"prompt": [{"role": "user", "content": "Name a colour."}],
             "chosen": [{"role": "assistant", "content": "Blue."}],
             "rejected": [{"role": "assistant", "content": "Seven."}]}] * 2
    cfg = config(tmp_path, tiny_dir, write_jsonl(tmp_path / "p.jsonl", rows), training={"objective": objective})
    assert main(["check", cfg, "--show-example", "1", "--set", "adapter.probe=false"]) == 0
    out = capsys.readouterr().out
    assert "--- example 1" in out and "[[Name a colour" not in out
    if objective == "dpo":
        assert "chosen:" in out and "[[Blue.<|im_end|>]]" in out and "rejected:" in out and "[[Seven.<|im_end|>]]" in out
    else:
        assert "label: desirable" in out and "[[Blue.<|im_end|>]]" in out and "Seven" not in out


def test_max_steps_zero_is_refused(tmp_path, tiny_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [chat("Hi", "Hello.")] * 4)
    assert main(["train", config(tmp_path, tiny_dir, data), "--set", "training.max_steps=0"]) == 2
    assert "training.max_steps: 0 would train nothing" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_empty_assistant_turns_are_dropped_and_counted_or_trained_when_asked(tmp_path, tiny_dir, tiny_tokenizer):
    from h1tune.config import DataConfig
    from h1tune.data import prepare_datasets

    rows = [chat("Hi", "Hello."), chat("Anything?", ""), chat("Blank?", "  \n"),
            {"messages": [{"role": "user", "content": "Weather?"},
                          {"role": "assistant", "content": "", "tool_calls": [{"name": "w", "arguments": {}}]}]}]
    path = write_jsonl(tmp_path / "e.jsonl", rows)
    dropped = prepare_datasets(DataConfig(train=[{"path": str(path)}], max_length=64), tiny_tokenizer, seed=0)
    assert len(dropped.train) == 2 and dropped.summary.train.dropped == {
        "empty assistant turn (data.empty_assistant: drop)": 2}
    assert "empty assistant turn (data.empty_assistant: drop)" in dropped.summary.format()
    kept = prepare_datasets(DataConfig(train=[{"path": str(path)}], max_length=64, empty_assistant="train"),
                            tiny_tokenizer, seed=0)
    assert len(kept.train) == 4 and not kept.summary.train.dropped


def test_every_example_config_runs_from_a_fresh_clone(capsys):
    from h1tune.oumi import load_run_config
    from h1tune.train.preflight import check_inputs

    configs = sorted((REPO / "examples").glob("*.yaml"))
    assert len(configs) >= 2
    for path in configs:
        cfg = load_run_config(str(path), [])
        for source in cfg.data.train + cfg.data.eval:
            local = Path(source.path)
            assert local.is_file() and REPO in local.resolve().parents, f"{path.name}: {source.path} not shipped"
        inputs = check_inputs(cfg)  # tokenizer, template, every data file: as `h1tune check` does
        assert len(inputs.data.train) > 0, path.name


def test_alpaca_null_instruction_says_null(tmp_path, tiny_dir, capsys):
    data = tmp_path / "a.json"
    data.write_text(json.dumps([{"instruction": "Say hi.", "output": "Hi."}, {"instruction": None, "output": "x"}]))
    assert main(["check", config(tmp_path, tiny_dir, data)]) == 2
    err = capsys.readouterr().err
    assert "'instruction' set to null" in err and "missing" not in err


def test_train_help_names_every_objective(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("train"))
    assert "DPO" in line and "KTO" in line and "SFT" in line


def test_tool_calls_are_parsed_in_both_falcon_h1_layouts():
    from h1tune.generate import format_tool_calls, parse_tool_calls

    instruct = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    tiny = '<tool_call>[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]</tool_call>'
    content, calls = parse_tool_calls(instruct)
    assert content == "Let me check.<|im_end|>" and calls == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert [c["name"] for c in parse_tool_calls(tiny)[1]] == ["a", "b"]
    assert parse_tool_calls("<tool_call>{broken")[1] == [{"name": None, "raw": "{broken"}]
    assert format_tool_calls(calls) == 'tool call: get_weather({"city": "Paris"})'


def test_generate_shows_a_generated_tool_call_structured(tiny_dir, monkeypatch):
    """The markers are special tokens: the reply text hides them, the structured line shows the call."""
    import io

    from h1tune.config import ModelConfig
    from h1tune.generate import SamplingConfig, generate_reply, load_for_generation

    model, tokenizer = load_for_generation(ModelConfig(name_or_path=str(tiny_dir)))
    call = tokenizer('<tool_call>{"name": "lookup_0", "arguments": {"identifier": "A7"}}</tool_call><|im_end|>',
                     add_special_tokens=False)["input_ids"]
    original = model.generate

    def generate_the_call(input_ids, **kwargs):  # the tiny random model would not call a tool by itself
        original(input_ids=input_ids, **{**kwargs, "max_new_tokens": 1})  # the real path runs
        return torch.cat([input_ids, torch.tensor([call])], dim=1)

    monkeypatch.setattr(model, "generate", generate_the_call)
    out = io.StringIO()
    reply = generate_reply(model, tokenizer, [{"role": "user", "content": "Find A7."}], SamplingConfig(),
                           stream=True, tools=TOOLS, output=out)
    assert "<tool_call>" not in reply
    assert 'tool call: lookup_0({"identifier": "A7"})' in out.getvalue()


def test_a_tools_file_that_is_not_a_list_of_schemas_is_refused(tmp_path, tiny_dir, capsys):
    for content, why in [({"name": "x"}, "holds dict"), (["get_weather"], "is a str"),
                         ([{"name": "x", "parameters": "city"}], "`parameters`"), ([], "holds nothing")]:
        (tmp_path / "tools.json").write_text(json.dumps(content))
        assert main(["generate", str(tiny_dir), "--prompt", "x", "--tools", str(tmp_path / "tools.json")]) == 2
        err = capsys.readouterr().err
        assert why in err and "a JSON list of tool signatures" in err and "Traceback" not in err


def test_kto_from_pairs_counts_add_up(tmp_path, tiny_tokenizer):
    from h1tune.config import DataConfig
    from h1tune.data.preference_prepare import prepare_preference_data

    rows = [{"prompt": [{"role": "user", "content": "Q?"}], "chosen": [{"role": "assistant", "content": "Good."}],
             "rejected": [{"role": "assistant", "content": "Bad " * 40}]}] * 5
    data = DataConfig(train=[{"path": str(write_jsonl(tmp_path / "p.jsonl", rows))}], max_length=24,
                      truncation="drop")
    summary = prepare_preference_data(data, tiny_tokenizer, seed=0, objective="kto").summary
    text = summary.format()
    assert "5 rows -> 5 pairs, each split into a desirable (chosen) and an undesirable (rejected) example -> " \
           "10 examples" in text
    lines = {line.rsplit(None, 2)[0].strip(): int(line.split()[-2]) for line in text.splitlines()
             if line.strip().startswith(("examples", "dropped")) and line.split()[-2].isdigit()}
    assert lines["examples"] == 10 and lines["examples kept"] + lines["dropped"] == 10 and lines["dropped"] == 5
