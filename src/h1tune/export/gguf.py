"""`h1tune export gguf`: a fine-tuned Falcon-H1 as one GGUF file for llama.cpp, Ollama and LM Studio.

    h1tune export gguf runs/sft model-q8_0.gguf --outtype q8_0     # a run dir, adapter dir or merged dir

    report = export_gguf("runs/sft", "model.gguf", outtype="f32")
    print(report.format())

An adapter is first merged into its base (h1tune.export.merge, with its own verification; QLoRA
adapters into the dequantized base they trained against), in fp32 so the weights are rounded once,
by the converter. llama.cpp's own converter then writes the file (it folds the μP multipliers into
the weights, so it needs the stock config.json a merge writes). The file is written beside OUT under
a temporary name, loaded in llama.cpp and compared with transformers (h1tune.export.gguf_verify),
and renamed to OUT only when the comparison passes: a failed export leaves no OUT behind.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from h1tune.errors import H1tuneError
from h1tune.export.gguf_verify import GGUFCheck

log = logging.getLogger("h1tune")

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass
class GGUFReport:
    """What was exported, from what, through which converter, and how llama.cpp compared."""

    source: str
    source_kind: str  # "adapter" (merged first) or "checkpoint"
    out_file: str
    outtype: str
    size_bytes: int
    converter: str
    pre_tokenizer_told: str | None  # the name given to the converter because its hash check refused
    check: GGUFCheck
    merge: Any = None  # the MergeReport when an adapter was merged first
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = []
        if self.merge is not None:
            lines += [self.merge.format(), ""]
        lines.append(f"exported {self.source} ({self.source_kind}) -> {self.out_file} ({self.outtype}, "
                     f"{self.size_bytes / 2**20:.1f} MiB) with {self.converter}")
        lines.append(f"pre-tokenizer: the converter's hash check did not know this tokenizer, so it was told "
                     f"{self.pre_tokenizer_told!r}; llama.cpp's tokenization was checked against transformers"
                     if self.pre_tokenizer_told else
                     f"pre-tokenizer: recognised by the converter's hash check as {self.check.pre_tokenizer!r}")
        lines.append(self.check.format())
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "source_kind": self.source_kind, "out_file": self.out_file,
                "outtype": self.outtype, "size_bytes": self.size_bytes, "converter": self.converter,
                "pre_tokenizer_told": self.pre_tokenizer_told, "check": self.check.as_dict(),
                "merge": self.merge.as_dict() if self.merge is not None else None, "notes": self.notes}


def resolve_source(source: str) -> tuple[str, Path]:
    """("adapter", adapter dir) for a run or adapter dir; ("checkpoint", dir) for a merged/stock one."""
    from h1tune.adapters.checkpoint import find_adapter_dir
    from h1tune.model import resolve_model_path
    from h1tune.presets import PRESETS

    adapter = find_adapter_dir(source)
    if adapter is not None:
        return "adapter", adapter
    path = Path(resolve_model_path(source) if source in PRESETS else source)
    if not path.is_dir():
        raise H1tuneError(f"source: {source!r} is not a directory; give a run directory, an adapter directory or "
                          "a merged Falcon-H1 checkpoint directory (a hub model: download it first)")
    config = path / "config.json"
    if not config.is_file():
        raise H1tuneError(f"source: {path} has neither adapter_config.json (an adapter), final/ (a run) nor "
                          "config.json (a checkpoint)")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type != "falcon_h1":
        raise H1tuneError(f"source: {config} is a {model_type!r} model; h1tune exports Falcon-H1 (falcon_h1)")
    if "quantization_config" in json.loads(config.read_text()):
        raise H1tuneError(f"source: {path} is a pre-quantized checkpoint; export its 16-bit original (llama.cpp "
                          "quantizes with --outtype q8_0)")
    return "checkpoint", path


def check_out_file(out: Path, overwrite: bool) -> None:
    if out.suffix != ".gguf":
        raise H1tuneError(f"OUT: {str(out)!r} should end in .gguf (llama.cpp tools and Ollama look for it)")
    if out.is_dir():
        raise H1tuneError(f"OUT: {out} is a directory; give a file name such as {out / 'model.gguf'}")
    if out.exists() and not overwrite:
        raise H1tuneError(f"OUT: {out} exists; choose another name or pass --overwrite")


def export_gguf(source: str, out: str | Path, *, outtype: str = "f32", base: str | None = None,
                converter: str | None = None, converter_sdist: str | None = None, pre_tokenizer: str = "auto",
                overwrite: bool = False, greedy_tokens: int = 16, threads: int | None = None,
                tolerance: float | None = None) -> GGUFReport:
    """Merge (if needed), convert with llama.cpp's converter, verify in llama.cpp, publish OUT.

    Args:
        source: a run dir, an adapter dir, a merged/stock Falcon-H1 dir, or a preset name.
        out: the .gguf file to write.
        outtype: f32, f16, bf16 or q8_0 (the converter's names).
        base: the adapter's base when adapter_config.json's is not the one to use.
        converter: llama.cpp's convert_hf_to_gguf.py (or its directory); default: $H1TUNE_GGUF_CONVERTER,
            else the copy cached from the installed llama-cpp-python's source distribution.
        converter_sdist: a downloaded llama-cpp-python sdist to take the converter from (offline machines).
        pre_tokenizer: what to tell the converter when its hash check does not know the tokenizer.
        greedy_tokens: decode length compared per prompt; threads: llama.cpp threads.
        tolerance: max |Δ logprob| allowed (default by outtype, gguf_verify.LOGPROB_TOLERANCE).

    Raises:
        H1tuneError: bad inputs, a refused conversion, or a failed verification (OUT not written).
    """
    from h1tune.export.gguf_convert import choose_pre_tokenizer, fetch_converter, find_converter, run_converter
    from h1tune.export.gguf_verify import require_llama_cpp, verify_gguf

    if outtype not in OUTTYPES:
        raise H1tuneError(f"outtype: must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    out = Path(out)
    check_out_file(out, overwrite)
    kind, path = resolve_source(source)
    require_llama_cpp()  # before any merging: the export cannot finish without it
    script = find_converter(converter) or fetch_converter(converter_sdist)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.exporting-", dir=out.parent))
    try:
        merge, model_dir = None, path
        if kind == "adapter":
            from h1tune.export.merge import merge_adapter

            model_dir = work / "merged"
            merge = merge_adapter(base, str(path), str(model_dir), dtype="float32", greedy_tokens=greedy_tokens)
        offered = choose_pre_tokenizer(model_dir, pre_tokenizer)
        staged = work / out.name
        conversion = run_converter(script, model_dir, staged, outtype, offered)
        log.info("verifying %s in llama.cpp against transformers", out.name)
        check = verify_gguf(staged, model_dir, outtype, greedy_tokens=greedy_tokens, threads=threads,
                            tolerance=tolerance)
        report = GGUFReport(str(source), kind, str(out), outtype, staged.stat().st_size, str(script),
                            offered if conversion.pre_tokenizer_told else None, check, merge)
        if merge is not None:
            report.notes.append("the merged checkpoint was temporary; `h1tune merge` keeps one to export again")
        if not check.passed:
            raise H1tuneError(f"verification failed: llama.cpp on the {outtype} file does not reproduce "
                              f"transformers; nothing was written to {out}.\n{report.format()}")
        from h1tune.atomic import publish_file

        publish_file(staged, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("wrote %s", out)
    return report
