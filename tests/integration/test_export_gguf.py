"""`h1tune export gguf` on the tiny preset: a LoRA SFT run exported through llama.cpp's converter and
run in llama.cpp, which must decode the same greedy tokens as transformers (f32); quantized files
within tolerance; refusals and failed verifications leave no OUT.gguf.

Tests marked `gguf` need llama-cpp-python (built from source) and llama.cpp's converter; they skip,
saying which is missing, without them:
    pip install -e '.[gguf]' && bash scripts/test.sh -m gguf tests/integration/test_export_gguf.py
The rest (install hint, source and output checks, the pre-tokenizer choice) runs everywhere.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from h1tune.cli import main
from h1tune.errors import H1tuneError
from h1tune.export.gguf import export_gguf


def _llama_cpp_missing() -> str | None:
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return f"needs llama-cpp-python and gguf (pip install -e '.[gguf]'): {exc}"
    from h1tune.export.gguf_convert import find_converter

    if find_converter() is None:
        return ("needs llama.cpp's converter: set H1TUNE_GGUF_CONVERTER to convert_hf_to_gguf.py, or run "
                "python -c 'from h1tune.export.gguf_convert import fetch_converter; fetch_converter()' once")
    return None


needs_llama_cpp = [pytest.mark.gguf, pytest.mark.skipif(bool(_llama_cpp_missing()),
                                                        reason=_llama_cpp_missing() or "")]
THREADS = 1  # shared 2-core machines: one llama.cpp thread, as torch in conftest


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_dir) -> Path:
    """A LoRA SFT run on the tiny preset that memorises three short chats (8 steps)."""
    from h1tune.config import load_config
    from h1tune.train.run import run_training

    root = tmp_path_factory.mktemp("gguf")
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in [("Say hello.", "Hello!"), ("Capital of France?", "Paris."), ("Count to three.", "One, two.")]]
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    cfg = load_config(None, [f"model.name_or_path={tiny_dir}", f"data.train={data}", "data.max_length=64",
                             "adapter.lora_dropout=0.0", "training.learning_rate=1e-2", "training.max_steps=8",
                             "training.per_device_train_batch_size=4", "training.save_steps=8",
                             "training.report_to=[none]", f"output_dir={root / 'run'}"])
    return run_training(cfg).output_dir


@pytest.fixture(scope="module")
def merged(sft_run, tmp_path_factory) -> Path:
    from h1tune.export.merge import merge_adapter

    out = tmp_path_factory.mktemp("gguf-merged") / "merged"
    merge_adapter(None, str(sft_run), str(out), dtype="float32", greedy_tokens=2)
    return out


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def gguf_test(fn):
    """Mark a test `gguf` and skip it, saying what is missing, without llama.cpp."""
    for mark in reversed(needs_llama_cpp):
        fn = mark(fn)
    return fn


@gguf_test
def test_run_dir_is_merged_then_f32_file_decodes_like_transformers_token_for_token(sft_run, merged, tmp_path,
                                                                                      capsys):
    out = tmp_path / "tuned-f32.gguf"
    assert main(["export", "gguf", str(sft_run), str(out), "--outtype", "f32", "--threads", str(THREADS)]) == 0
    printed = capsys.readouterr().out
    assert "merged" in printed and "PASS" in printed, printed
    from h1tune.export.gguf_verify import read_metadata, verify_gguf

    meta = read_metadata(out)
    assert meta["general.architecture"] == "falcon-h1" and meta["general.file_type"] == 0  # ALL_F32
    from h1tune.presets import CHAT_TEMPLATE

    assert meta["tokenizer.chat_template"] == CHAT_TEMPLATE and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert _leftovers(tmp_path) == [out.name], "no temporary files or merged dirs left beside OUT"
    # The fine-tune survives: on a chat it memorised, llama.cpp decodes what transformers decodes.
    check = verify_gguf(out, merged, "f32", threads=THREADS, greedy_tokens=8,
                        conversations=[[{"role": "user", "content": "Say hello."}]])
    assert check.passed and check.greedy_same == 1 and check.greedy_tokens >= 2, check.format()
    assert check.max_dlogprob < 1e-3 and check.top1_agreement == 1.0


@gguf_test
@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_quantized_files_verify_within_tolerance_and_are_smaller(merged, tmp_path, outtype):
    report = export_gguf(str(merged), tmp_path / f"m-{outtype}.gguf", outtype=outtype, threads=THREADS)
    check = report.check
    assert report.source_kind == "checkpoint" and report.merge is None and report.pre_tokenizer_told == "gpt-2"
    assert check.passed and not check.problems, check.format()
    assert 0 < check.max_dlogprob <= check.tolerance  # rounded weights: close, not bit-identical
    f32_bytes = sum(p.stat().st_size for p in merged.glob("*.safetensors"))
    assert report.size_bytes < 0.6 * f32_bytes, (report.size_bytes, f32_bytes)


@gguf_test
def test_wrong_pre_tokenizer_fails_verification_and_leaves_no_file(merged, tmp_path):
    """llama-bpe (Falcon-H1's published rules) splits ' 21' and newline + indent unlike the presets' GPT-2
    byte-level BPE; the file converts and loads, but llama.cpp tokenizes differently: nothing is published."""
    out = tmp_path / "wrong.gguf"
    with pytest.raises(H1tuneError, match="code \\+ tool call tokenizes differently") as info:
        export_gguf(str(merged), out, outtype="f32", pre_tokenizer="llama-bpe", threads=THREADS, greedy_tokens=2)
    assert "nothing was written" in str(info.value)
    assert _leftovers(tmp_path) == []


@gguf_test
def test_converter_refusal_of_an_unknown_tokenizer_is_explained(merged, tmp_path):
    out = tmp_path / "refused.gguf"
    with pytest.raises(H1tuneError, match="does not recognise this tokenizer's BPE pre-tokenizer") as info:
        export_gguf(str(merged), out, pre_tokenizer="none", threads=THREADS)
    assert "--pre-tokenizer" in str(info.value)
    assert _leftovers(tmp_path) == []


@gguf_test
def test_failed_comparison_leaves_no_file(merged, tmp_path, monkeypatch):
    from h1tune.export import gguf_verify

    real = gguf_verify.compare_logprobs

    def with_a_changed_token(outtype, reference, got, tolerance):
        got.greedy[0] = [t + 1 for t in got.greedy[0]]  # as if llama.cpp decoded another token
        return real(outtype, reference, got, tolerance)

    monkeypatch.setattr(gguf_verify, "compare_logprobs", with_a_changed_token)
    out = tmp_path / "m.gguf"
    with pytest.raises(H1tuneError, match="verification failed"):
        export_gguf(str(merged), out, outtype="f32", threads=THREADS, greedy_tokens=2)
    assert not out.exists() and _leftovers(tmp_path) == []


@gguf_test
@pytest.mark.slow
def test_the_05b_shape_converts_and_verifies(tmp_path):
    """Published 0.5B shapes (random weights): 36 layers, 24 SSM heads, vocab rows beyond the tokenizer's."""
    report = export_gguf("0.5b", tmp_path / "h1-05b.gguf", outtype="q8_0", threads=2, greedy_tokens=4)
    assert report.check.passed and report.check.prompts == 3, report.format()


# ---- without llama.cpp: the parts that run everywhere ----

def test_without_llama_cpp_the_command_says_how_to_install_it(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    out = tmp_path / "m.gguf"
    assert main(["export", "gguf", str(tiny_dir), str(out)]) == 2
    err = capsys.readouterr().err
    assert "pip install -e '.[gguf]'" in err and "cmake" in err and "Traceback" not in err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_bad_sources_and_outputs_are_refused_before_any_work(tiny_dir, tmp_path):
    with pytest.raises(H1tuneError, match="should end in .gguf"):
        export_gguf(str(tiny_dir), tmp_path / "m.bin")
    (tmp_path / "taken.gguf").write_text("x")
    with pytest.raises(H1tuneError, match="--overwrite"):
        export_gguf(str(tiny_dir), tmp_path / "taken.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(H1tuneError, match="neither adapter_config.json"):
        export_gguf(str(tmp_path / "empty"), tmp_path / "m.gguf")
    with pytest.raises(H1tuneError, match="outtype"):
        export_gguf(str(tiny_dir), tmp_path / "m.gguf", outtype="q4_k")


def test_pre_tokenizer_choice_follows_the_tokenizer_json(tiny_dir, tmp_path):
    import shutil

    from h1tune.export.gguf_convert import choose_pre_tokenizer

    assert choose_pre_tokenizer(tiny_dir, "auto") == "gpt-2"  # the presets' GPT-2 byte-level BPE
    assert choose_pre_tokenizer(tiny_dir, "none") is None
    assert choose_pre_tokenizer(tiny_dir, "llama-bpe") == "llama-bpe"
    other = tmp_path / "other"
    shutil.copytree(tiny_dir, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, spec["pre_tokenizer"]]}
    (other / "tokenizer.json").write_text(json.dumps(spec))
    assert choose_pre_tokenizer(other, "auto") is None, "other splitting rules: the converter decides alone"


def test_the_pre_tokenizer_text_is_the_converters_own():
    """The tokenization check uses the text the converter hashes; a converter update must not drift from it."""
    import ast
    import re

    from h1tune.export.gguf_convert import find_converter
    from h1tune.export.gguf_verify import PRE_TOKENIZER_TEXT

    script = find_converter()
    if script is None:
        pytest.skip("llama.cpp's converter is not here (see the gguf tests' skip reason)")
    source = (script.parent / "conversion" / "base.py").read_text(encoding="utf-8")
    assert ast.literal_eval(re.search(r"^\s*chktxt = (.*)$", source, re.M).group(1)) == PRE_TOKENIZER_TEXT


def test_converter_is_unpacked_from_an_sdist_without_the_cpp_sources(tmp_path, monkeypatch):
    import io
    import tarfile

    from h1tune.export.gguf_convert import find_converter, unpack_converter

    sdist = tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    files = {"vendor/llama.cpp/convert_hf_to_gguf.py": "print('converter')",
             "vendor/llama.cpp/conversion/falcon_h1.py": "", "vendor/llama.cpp/gguf-py/gguf/__init__.py": "",
             "vendor/llama.cpp/src/llama-vocab.cpp": "// C++", "llama_cpp/llama.py": ""}
    with tarfile.open(sdist, "w:gz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(f"llama_cpp_python-9.9.9/{name}")
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    monkeypatch.setenv("H1TUNE_CACHE", str(tmp_path / "cache"))
    script = unpack_converter(sdist, "9.9.9")
    root = script.parent
    assert script.read_text() == "print('converter')"
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == [
        "conversion/falcon_h1.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    assert find_converter(root) == script  # a llama.cpp directory means the script inside it
    with pytest.raises(H1tuneError, match="is not llama.cpp's convert_hf_to_gguf.py"):
        find_converter(tmp_path)
