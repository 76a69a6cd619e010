"""The CLI: instant --help for every subcommand, errors without tracebacks, init-model + generate."""

import subprocess
import sys

import pytest

from h1tune.cli import build_parser, main


def subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


@pytest.mark.parametrize("name", subcommands())
def test_every_subcommand_help_exits_zero(name, capsys):
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: h1tune {name}" in out and len(out.splitlines()) > 4, "a description and options, not a stub"


def test_help_does_not_import_torch():
    code = "import sys; from h1tune.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_user_errors_exit_non_zero_without_traceback(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert main(["init-model", str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err and "--overwrite" in err


def test_generate_streams_a_reply_from_a_model_directory(tiny_dir, capsys):
    from h1tune.config import ModelConfig
    from h1tune.generate import SamplingConfig, generate_reply, load_for_generation

    assert main(["generate", str(tiny_dir), "--prompt", "Hello", "--max-new-tokens", "5"]) == 0
    streamed = capsys.readouterr().out
    model, tokenizer = load_for_generation(ModelConfig(name_or_path=str(tiny_dir)))
    reply = generate_reply(model, tokenizer, [{"role": "user", "content": "Hello"}],
                           SamplingConfig(max_new_tokens=5), stream=False)
    assert reply.strip() and streamed.strip() == reply.strip()  # greedy: the CLI streamed exactly this reply


def test_the_train_command_runs_without_bitsandbytes_when_nothing_is_quantized(tmp_path, tiny_dir):
    """peft imports bitsandbytes (~1 s) whether or not it is used: the console command hides it from a
    run that quantizes nothing, and a caller's session calling main() keeps its modules."""
    data = tmp_path / "rows.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n' * 4)
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{name_or_path: {tiny_dir}}}\ndata: {{train: {data}}}\n"
                      f"training: {{max_steps: 1, report_to: [none]}}\noutput_dir: {tmp_path / 'out'}\n")
    code = ("import sys, h1tune.cli as cli; sys.argv = ['h1tune', 'train', sys.argv[1]]; rc = cli.main(); "
            "print('RESULT', rc, sys.modules.get('bitsandbytes', 'never imported'))")
    done = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "RESULT 0 None" in done.stdout  # hidden: an import of it raised ImportError, peft ran without it
    assert (tmp_path / "out" / "final" / "adapter_model.safetensors").exists()
