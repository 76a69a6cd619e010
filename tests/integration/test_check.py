"""`h1tune check`: passes on a good config, exits non-zero with the file and line on bad data."""

import json

import yaml

from h1tune.cli import main


def write_config(tmp_path, tiny_dir, data_file):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": str(tiny_dir)},
                                    "data": {"train": str(data_file), "max_length": 64},
                                    "output_dir": str(tmp_path / "run")}))
    return path


def test_check_passes_and_prints_the_probe_table(tmp_path, tiny_dir, capsys):
    data = tmp_path / "ok.jsonl"
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]}
    data.write_text((json.dumps(row) + "\n") * 3)
    assert main(["check", str(write_config(tmp_path, tiny_dir, data))]) == 0
    out = capsys.readouterr().out
    assert "chat template: ok" in out and "check passed" in out
    assert "adapter probe: 32/32 LoRA modules live" in out  # a line per group, not per module
    assert "mamba: 4/4 live" in out and "in_proj" not in out
    assert not (tmp_path / "run").exists(), "check writes no run"


def test_check_probe_table_examples_and_probe_off(tmp_path, tiny_dir, capsys):
    data = tmp_path / "ok.jsonl"
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]}
    data.write_text((json.dumps(row) + "\n") * 3)
    config = str(write_config(tmp_path, tiny_dir, data))
    assert main(["check", config, "--probe-table", "--show-example", "1"]) == 0
    out = capsys.readouterr().out
    assert "mamba.in_proj" in out and "out_proj" not in out  # the per-module table
    assert "[[Hello there.<|im_end|>" in out and "[[Hi" not in out  # the trained span, and only it
    assert main(["check", config, "--set", "adapter.probe=false"]) == 0
    out = capsys.readouterr().out
    assert "adapter probe: off" in out and "live" not in out


def test_check_fails_on_malformed_data_naming_file_and_line(tmp_path, tiny_dir, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": []}\n{"messages": [oops\n')
    assert main(["check", str(write_config(tmp_path, tiny_dir, data))]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "Traceback" not in err
