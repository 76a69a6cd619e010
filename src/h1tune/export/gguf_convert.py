"""Run llama.cpp's own `convert_hf_to_gguf.py` on a stock Falcon-H1 checkpoint; we write no converter.

    converter = find_converter() or fetch_converter()     # from llama-cpp-python's source distribution
    run_converter(converter, "runs/sft-merged", Path("model.gguf"), "q8_0", pre_tokenizer="gpt-2")

The converter (and its `conversion/` package and `gguf-py`) ships in llama-cpp-python's source
distribution, not in its wheel nor in the `gguf` package, so h1tune keeps an unpacked copy per
llama-cpp-python version under $H1TUNE_CACHE/llama.cpp/ (the file that converts matches the llama.cpp
that verifies), or uses --converter / $H1TUNE_GGUF_CONVERTER.

The converter names a BPE pre-tokenizer by hashing the token ids of a fixed text, so a tokenizer
trained locally (h1tune's presets) is refused even when its splitting rules are a known one's. The
converter has no option for this; `python -m h1tune.export.gguf_convert --pre-tokenizer NAME ...`
runs it unchanged except that, only where its hash check refuses, it answers NAME. The verification
afterwards tokenizes the hash's own text and every prompt with llama.cpp and requires the same ids as
transformers, so a wrong NAME fails the export.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import runpy
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from h1tune.errors import H1tuneError

log = logging.getLogger("h1tune")

CONVERTER_ENV = "H1TUNE_GGUF_CONVERTER"
CONVERTER_SCRIPT = "convert_hf_to_gguf.py"
DIST = "llama-cpp-python"
# What the converter needs from the vendored llama.cpp tree (the C++ sources stay behind).
_VENDOR_PARTS = (CONVERTER_SCRIPT, "conversion/", "gguf-py/gguf/", "LICENSE")
GPT2_PRE_TOKENIZER = "gpt-2"  # llama.cpp's name (llama-vocab.cpp) for GPT-2's byte-level split regex
REFUSED_MARKER = "BPE pre-tokenizer was not recognized"
TOLD_MARKER = "h1tune: pre-tokenizer hash not recognised"


@dataclass
class Conversion:
    """What the converter did: its output file, the pre-tokenizer name offered and whether the
    converter needed it (its hash check refused the tokenizer), its log tail."""

    out_file: Path
    pre_tokenizer_offered: str | None
    pre_tokenizer_told: bool
    log_tail: str


def installed_llama_cpp_version() -> str | None:
    """llama-cpp-python's version from its metadata, without loading the shared library."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DIST)
    except PackageNotFoundError:
        return None


def converter_cache(version: str) -> Path:
    root = Path(os.environ.get("H1TUNE_CACHE", Path.home() / ".cache" / "h1tune"))
    return root / "llama.cpp" / f"{DIST}-{version}"


def find_converter(explicit: str | Path | None = None) -> Path | None:
    """--converter, else $H1TUNE_GGUF_CONVERTER, else the cached copy for the installed llama-cpp-python.

    A path may name the script or the llama.cpp directory that holds it.
    """
    given = explicit or os.environ.get(CONVERTER_ENV)
    if given:
        path = Path(given)
        path = path / CONVERTER_SCRIPT if path.is_dir() else path
        if not path.is_file() or not (path.parent / "conversion").is_dir():
            source = "--converter" if explicit else f"${CONVERTER_ENV}"
            raise H1tuneError(f"{source}: {str(given)!r} is not llama.cpp's {CONVERTER_SCRIPT} (with its conversion/ "
                              "package beside it); give the script or the llama.cpp directory that holds it")
        return path
    version = installed_llama_cpp_version()
    if version is None:
        return None
    cached = converter_cache(version) / CONVERTER_SCRIPT
    return cached if cached.is_file() else None


def unpack_converter(sdist: Path, version: str) -> Path:
    """Copy the converter, conversion/ and gguf-py/ out of a llama-cpp-python sdist into the cache."""
    from h1tune.atomic import publish_dir

    dest = converter_cache(version)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                _, sep, rel = member.name.partition("/vendor/llama.cpp/")
                if not sep or not member.isfile() or ".." in Path(rel).parts:
                    continue
                if any(rel == part or (part.endswith("/") and rel.startswith(part)) for part in _VENDOR_PARTS):
                    target = staged / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(tar.extractfile(member).read())
        if not (staged / CONVERTER_SCRIPT).is_file():
            raise H1tuneError(f"{sdist} holds no vendor/llama.cpp/{CONVERTER_SCRIPT}; is it llama-cpp-python's "
                              "source distribution?")
        return publish_dir(staged, dest) / CONVERTER_SCRIPT
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def fetch_converter(sdist: str | Path | None = None) -> Path:
    """The converter of the installed llama-cpp-python: from `sdist`, else `pip download` of its sdist."""
    version = installed_llama_cpp_version()
    if version is None:
        raise H1tuneError("llama-cpp-python is not installed; see `h1tune export gguf --help` for how to install it")
    if sdist is not None:
        return unpack_converter(Path(sdist), version)
    log.info("fetching llama.cpp's converter from the %s %s source distribution (pip download, ~80 MB)", DIST, version)
    with tempfile.TemporaryDirectory(prefix="h1tune-sdist-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               f"{DIST}=={version}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or not found:
            raise H1tuneError(
                f"could not download the {DIST} {version} source distribution ({done.stderr.strip()[-300:]}); "
                f"download it elsewhere and pass --converter-sdist FILE.tar.gz, or point --converter (or "
                f"${CONVERTER_ENV}) at convert_hf_to_gguf.py of a llama.cpp checkout")
        return unpack_converter(found[0], version)


def gpt2_byte_level(model_dir: str | Path) -> bool:
    """Does the checkpoint's tokenizer.json split text exactly as GPT-2's byte-level BPE does?

    That is: no normalizer and a lone ByteLevel pre-tokenizer with GPT-2's regex and no prefix space
    (h1tune's preset tokenizer). llama.cpp's `gpt-2` pre-tokenizer applies that same regex.
    """
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return False
    spec = json.loads(path.read_text(encoding="utf-8"))
    pre = spec.get("pre_tokenizer") or {}
    return (spec.get("normalizer") is None and (spec.get("model") or {}).get("type") == "BPE"
            and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"))


def choose_pre_tokenizer(model_dir: str | Path, requested: str) -> str | None:
    """The name to offer where the converter's hash check refuses: `auto` offers gpt-2 for a GPT-2
    byte-level tokenizer and nothing otherwise; `none` offers nothing; any other value is offered as given."""
    if requested == "none":
        return None
    if requested == "auto":
        return GPT2_PRE_TOKENIZER if gpt2_byte_level(model_dir) else None
    return requested


def run_converter(converter: Path, model_dir: str | Path, out_file: Path, outtype: str,
                  pre_tokenizer: str | None) -> Conversion:
    """Run the converter in a child Python (its imports and globals stay out of ours)."""
    cmd = [sys.executable, "-m", "h1tune.export.gguf_convert"]
    if pre_tokenizer:
        cmd += ["--pre-tokenizer", pre_tokenizer]
    cmd += [str(converter), str(model_dir), "--outfile", str(out_file), "--outtype", outtype]
    log.info("converting with llama.cpp's %s (%s)", converter, outtype)
    done = subprocess.run(cmd, capture_output=True, text=True)
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])
    if done.returncode != 0 or not out_file.is_file():
        out_file.unlink(missing_ok=True)
        raise H1tuneError(_conversion_failure(done.stdout + done.stderr, tail, pre_tokenizer))
    return Conversion(out_file, pre_tokenizer, TOLD_MARKER in done.stderr, tail)


def _conversion_failure(output: str, tail: str, offered: str | None) -> str:
    if REFUSED_MARKER in output:
        chkhsh = next((line.split("chkhsh:")[-1].strip() for line in output.splitlines() if "chkhsh:" in line), "?")
        return (f"llama.cpp's converter does not recognise this tokenizer's BPE pre-tokenizer (hash {chkhsh}): it "
                "names pre-tokenizers by hashing the ids of a fixed text, so any tokenizer trained locally is "
                "refused. A published Falcon-H1 tokenizer is recognised (falcon-h1). If this tokenizer splits text "
                "exactly like a known one, pass --pre-tokenizer NAME (e.g. gpt-2 for a GPT-2 byte-level BPE, "
                "llama-bpe for Llama-3-style rules); the export then checks that llama.cpp tokenizes like "
                "transformers, and fails if not")
    return f"llama.cpp's converter failed{f' (pre-tokenizer offered: {offered})' if offered else ''}:\n{tail}"


def _offer_pre_tokenizer(name: str) -> None:
    """Where the converter's hash check raises, return `name`; a recognised hash is kept as is."""
    from conversion.base import TextModel  # the converter's package, on sys.path from main()

    original = getattr(TextModel, "get_vocab_base_pre", None)
    if original is None:
        raise SystemExit("h1tune: this converter has no TextModel.get_vocab_base_pre; --pre-tokenizer cannot be "
                         "applied (run without it, or use a llama.cpp release that has it)")

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            print(f"{TOLD_MARKER}; using {name!r} as told (--pre-tokenizer)", file=sys.stderr)
            return name

    TextModel.get_vocab_base_pre = get_vocab_base_pre


def main(argv: list[str] | None = None) -> None:
    """python -m h1tune.export.gguf_convert [--pre-tokenizer NAME] CONVERTER [converter arguments...]"""
    parser = argparse.ArgumentParser(prog="python -m h1tune.export.gguf_convert")
    parser.add_argument("--pre-tokenizer")
    parser.add_argument("converter")
    args, rest = parser.parse_known_args(argv)
    script = Path(args.converter).resolve()
    sys.path.insert(0, str(script.parent))
    if "NO_LOCAL_GGUF" not in os.environ:  # as the converter does, so conversion/ imports its own gguf-py
        sys.path.insert(1, str(script.parent / "gguf-py"))
    if args.pre_tokenizer:
        _offer_pre_tokenizer(args.pre_tokenizer)
    sys.argv = [str(script), *rest]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
