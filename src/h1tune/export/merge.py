"""Merge a LoRA adapter into a full Falcon-H1 checkpoint, and prove that what ships is right.

    h1tune merge runs/sft/adapter runs/sft-merged              # base read from adapter_config.json
    h1tune merge ADAPTER OUT --base tiny --dtype bfloat16 --eval-prompts heldout.jsonl

    report = merge_adapter(None, "runs/sft/adapter", "runs/sft-merged")
    print(report.format())

The output is a stock Falcon-H1 directory (safetensors shards, config.json with the μP multipliers
as in the base, tokenizer + chat template, generation config) that plain transformers loads.
Verification always runs: the written directory is reloaded from disk and its logits are compared
with base + adapter on chat prompts; above tolerance the merge fails and nothing is published.

Two Falcon-H1 hazards are handled here:
- LoRA weights on mamba.conv1d / mamba.out_proj (foreign adapters) are refused, or dropped on
  request: the fused kernels read those weights raw, so such LoRAs never trained, and peft's merge
  of the depthwise conv1d crashes (Falcon-H1 issue #13).
- A QLoRA adapter was trained against dequantized NF4 weights, not the 16-bit originals. By default
  it is merged into those dequantized weights; `merge_into="original"` merges into the 16-bit base
  and the report gives the measured drift from the QLoRA model.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from h1tune.adapters.checkpoint import (adapter_base, bypassed_in_adapter, find_adapter_dir, read_adapter_config,
                                        refuse_bypassed, run_model_config, tokenizer_source, write_filtered_adapter)
from h1tune.atomic import publish_dir
from h1tune.config import ModelConfig, Quantization
from h1tune.errors import H1tuneError
from h1tune.export.out_dir import DTYPE_BYTES, check_disk_space, check_out_dir, estimate_size
from h1tune.export.verify import Comparison, Outputs

log = logging.getLogger("h1tune")

REPORT_FILE = "h1tune_merge.json"
OUTPUT_DTYPES = tuple(DTYPE_BYTES)
# config.json keys that may legitimately differ between base and merged checkpoint.
_CONFIG_KEYS_ALLOWED_TO_CHANGE = {"dtype", "torch_dtype", "transformers_version", "_name_or_path"}


@dataclass
class MergeReport:
    """What was merged, into what, and how the written checkpoint compares with its reference."""

    base: str
    adapter: str
    out_dir: str
    dtype: str
    quantized_base: str  # "none", "4bit" or "8bit"
    merge_into: str  # "original" or "dequantized" (QLoRA only)
    reference: str  # the model the merged checkpoint was verified against, in words
    verification: Comparison
    tolerance: float
    adapter_effect: Comparison  # base vs base + adapter: shows the check is not vacuous
    drift: Comparison | None = None  # QLoRA only: a 16-bit-original merge vs the QLoRA model
    drift_label: str = ""
    dropped: dict[str, list[str]] = field(default_factory=dict)  # leaf name -> module paths
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.verification.relative <= self.tolerance

    def format(self) -> str:
        lines = [f"merged {self.adapter} into {self.base} -> {self.out_dir} ({self.dtype})"]
        if self.quantized_base != "none":
            lines.append(f"QLoRA adapter ({self.quantized_base} base): merged into the "
                         f"{'dequantized ' + self.quantized_base if self.merge_into == 'dequantized' else 'original 16-bit'}"
                         " base weights")
        for leaf, paths in self.dropped.items():
            lines.append(f"dropped LoRA weights on {len(paths)} mamba.{leaf} module(s) "
                         f"(under the fused kernels they never trained): {', '.join(paths[:3])}"
                         f"{' ...' if len(paths) > 3 else ''}")
        lines.append(f"adapter effect (base vs base + adapter): {self.adapter_effect.format()}")
        lines.append(f"verification vs {self.reference} ({self.verification.prompts} prompts, reloaded from disk):")
        lines.append(f"  {self.verification.format()}")
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(f"  {verdict}: relative {self.verification.relative:.3g} vs tolerance {self.tolerance:.3g}")
        if self.drift is not None:
            lines.append(f"{self.drift_label}:")
            lines.append(f"  {self.drift.format()}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "base": self.base, "adapter": self.adapter, "dtype": self.dtype, "quantized_base": self.quantized_base,
            "merge_into": self.merge_into, "reference": self.reference, "tolerance": self.tolerance,
            "verification": self.verification.as_dict(), "adapter_effect": self.adapter_effect.as_dict(),
            "drift": self.drift.as_dict() if self.drift else None, "drift_label": self.drift_label,
            "dropped": self.dropped, "notes": self.notes,
        }


@dataclass
class MergePlan:
    """Everything decided before any weights load: inputs read, choices checked, output allowed."""

    adapter_dir: Path
    base_name: str
    base_path: str
    base_config: dict[str, Any]
    run_cfg: ModelConfig | None
    quant: str
    out_dtype: str
    tolerance: float
    bypassed: dict[str, list[str]]
    out: Path
    needed_bytes: int | None


@dataclass
class References:
    """The unmerged model to merge, what the merged one must reproduce, and the context for the report."""

    peft_model: Any
    reference: Outputs
    label: str
    adapter_effect: Comparison
    qlora: Outputs | None = None  # QLoRA: the 4-bit base + adapter outputs
    drift: Comparison | None = None
    drift_label: str = ""


def _base_config(base_path: str) -> dict[str, Any]:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base_path)
    except (OSError, ValueError) as exc:
        raise H1tuneError(f"base: cannot read config.json of {base_path!r} ({exc}); pass base= (--base) with the "
                          "16-bit Falcon-H1 the adapter was trained on") from None
    # Through the same JSON encoder that writes the merged config.json, so the two compare as equals.
    return json.loads(config.to_json_string(use_diff=False))


def _config_dtype(config: dict[str, Any]) -> str:
    value = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
    return value if value in OUTPUT_DTYPES else "float32"


def _check_config_untouched(base_config: dict[str, Any], merged_dir: Path) -> None:
    """Every config field (μP multipliers included) as in the base, and no quantization_config."""
    merged = json.loads((merged_dir / "config.json").read_text())
    problems = []
    if "quantization_config" in merged:
        problems.append("quantization_config is present")
    for key, value in base_config.items():
        if key in _CONFIG_KEYS_ALLOWED_TO_CHANGE or key not in merged:
            continue
        if merged[key] != value:
            problems.append(f"{key}: base {value!r}, merged {merged[key]!r}")
    if problems:
        raise H1tuneError(f"internal: the merged config.json differs from the base's ({'; '.join(problems[:5])}); "
                          "please report this")


def plan_merge(base: str | None, adapter: str, out_dir: str, *, dtype: str, drop_bypassed: bool, merge_into: str,
               quantized_base: str | None, overwrite: bool, tolerance: float | None) -> MergePlan:
    """Read the adapter and the base's config, check every choice and the output dir; load no weights."""
    from h1tune.export.verify import default_tolerance
    from h1tune.model import resolve_model_path

    adapter_dir = find_adapter_dir(adapter) or Path(adapter)  # a run directory means its final/
    read_adapter_config(adapter_dir)
    base_name = base or adapter_base(adapter_dir)
    run_cfg = run_model_config(adapter_dir)
    base_path = resolve_model_path(base_name, run_cfg.seed if run_cfg else 0)
    base_config = _base_config(base_path)
    if base_config.get("model_type") != "falcon_h1":
        raise H1tuneError(f"base: {base_name!r} is a {base_config.get('model_type')!r} model; h1tune merges into "
                          "Falcon-H1 (model_type falcon_h1)")
    if "quantization_config" in base_config:
        raise H1tuneError(f"base: {base_name!r} is a pre-quantized checkpoint; merge into its 16-bit original "
                          "(h1tune quantizes the base itself when the adapter was trained with QLoRA)")
    quant = quantized_base or (run_cfg.quantization if run_cfg else "none")
    if quant not in get_args(Quantization):
        raise H1tuneError(f"quantized_base: must be one of {', '.join(get_args(Quantization))}, got {quant!r}")
    if merge_into not in ("dequantized", "original"):
        raise H1tuneError(f"merge_into: must be 'dequantized' or 'original', got {merge_into!r}")
    base_dtype = _config_dtype(base_config)
    out_dtype = base_dtype if dtype == "base" else dtype
    if out_dtype not in OUTPUT_DTYPES:
        raise H1tuneError(f"dtype: must be base, {', '.join(OUTPUT_DTYPES)}; got {dtype!r}")
    found = bypassed_in_adapter(adapter_dir)
    if found and not drop_bypassed:
        refuse_bypassed(adapter_dir, found)
    out = Path(out_dir)
    protected = [adapter_dir] + ([Path(base_path)] if Path(base_path).exists() else [])
    check_out_dir(out, protected, overwrite)
    needed = estimate_size(base_path, base_dtype, out_dtype)
    if needed is not None:
        check_disk_space(out, needed)
    tol = tolerance if tolerance is not None else default_tolerance(out_dtype)
    return MergePlan(adapter_dir, str(base_name), base_path, base_config, run_cfg, quant, out_dtype, tol, found,
                     out, needed)


def _plain_references(base_cfg: ModelConfig, adapter_dir: Path, device_map, prompts, greedy: int, eos) -> References:
    """A 16-bit base: the reference is base + adapter, unmerged."""
    from h1tune.export.verify import compare, model_outputs

    peft_model = _with_adapter(_load(base_cfg, device_map), adapter_dir)
    reference = model_outputs(peft_model, prompts, greedy, eos)
    with peft_model.disable_adapter():
        effect = compare(reference, model_outputs(peft_model, prompts, greedy_tokens=0, eos_ids=eos))
    return References(peft_model, reference, "base + adapter (unmerged)", effect)


def _qlora_references(plan: MergePlan, base_cfg: ModelConfig, adapter_dir: Path, device_map, prompts, greedy: int,
                      eos, merge_into: str) -> References:
    """A QLoRA adapter: load the base quantized exactly as in training, and merge into what it trained against."""
    from h1tune.export.dequantize import copy_dequantized_weights
    from h1tune.export.verify import compare, model_outputs

    run_cfg = plan.run_cfg
    qcfg = (run_cfg or base_cfg).model_copy(update={
        "name_or_path": plan.base_path, "quantization": plan.quant,
        "dtype": run_cfg.dtype if run_cfg and run_cfg.dtype != "auto" else base_cfg.dtype})
    log.info("loading the base in %s exactly as in training (out_proj and lm_head kept whole)", plan.quant)
    qmodel = _with_adapter(_load(qcfg, device_map or "cpu"), adapter_dir)
    qlora = model_outputs(qmodel, prompts, greedy, eos)
    with qmodel.disable_adapter():
        effect = compare(qlora, model_outputs(qmodel, prompts, greedy_tokens=0, eos_ids=eos))
    peft_model = _with_adapter(_load(base_cfg, device_map), adapter_dir)
    original = model_outputs(peft_model, prompts, greedy, eos)
    refs = References(peft_model, original, "the 16-bit base + adapter (unmerged)", effect, qlora=qlora)
    if merge_into == "dequantized":
        replaced = copy_dequantized_weights(qmodel, peft_model)
        log.info("replaced %d base Linears with their dequantized %s weights", replaced, plan.quant)
        refs.reference, refs.label = qlora, f"the QLoRA model ({plan.quant} base + adapter)"
        refs.drift = compare(qlora, original)
        refs.drift_label = ("for comparison, merging into the original 16-bit weights instead would drift from "
                            "the QLoRA model by")
    del qmodel
    gc.collect()
    return refs


def _write_merged(plan: MergePlan, peft_model, tokenizer, staged: Path, max_shard_size: str) -> None:
    """merge_and_unload, cast to the output dtype, save as a stock checkpoint, check config.json."""
    import torch

    merged = peft_model.merge_and_unload(safe_merge=True)
    merged = merged.to(getattr(torch, plan.out_dtype))
    for attr in ("quantization_method", "hf_quantizer"):
        if getattr(merged, attr, None) is not None:
            setattr(merged, attr, None)
    merged.config.dtype = getattr(torch, plan.out_dtype)
    if plan.needed_bytes is None:
        check_disk_space(plan.out, sum(p.numel() for p in merged.parameters()) * DTYPE_BYTES[plan.out_dtype])
    log.info("writing the merged checkpoint (%s)", plan.out_dtype)
    merged.save_pretrained(staged, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(staged)
    del merged
    gc.collect()
    _check_config_untouched(plan.base_config, staged)


def merge_adapter(
    base: str | None,
    adapter: str,
    out_dir: str,
    *,
    dtype: str = "base",
    drop_bypassed: bool = False,
    merge_into: Literal["dequantized", "original"] = "dequantized",
    quantized_base: Quantization | None = None,
    overwrite: bool = False,
    eval_prompts: str | list | None = None,
    tolerance: float | None = None,
    max_shard_size: str = "5GB",
    device: str | None = None,
    greedy_tokens: int = 16,
) -> MergeReport:
    """Merge `adapter` into `base`, write a stock Falcon-H1 checkpoint to `out_dir`, verify it from disk.

    Args:
        base: model directory, hub id or h1tune preset; None = the adapter's base_model_name_or_path.
        adapter: directory of a peft LoRA adapter (adapter_config.json + adapter_model.safetensors).
        out_dir: where the merged checkpoint goes; written to a temporary sibling and renamed at the end.
        dtype: "base" (the base checkpoint's dtype), "float32", "bfloat16" or "float16".
        drop_bypassed: merge an adapter that has LoRA weights on mamba.conv1d/out_proj without them.
        merge_into: for QLoRA adapters, "dequantized" (the 4-bit weights the adapter trained against)
            or "original" (the 16-bit base; the report gives the drift from the QLoRA model).
        quantized_base: "4bit"/"8bit" if the adapter was trained on a quantized base, "none" if not;
            None reads it from h1tune's config.yaml saved beside the adapter (or its parent).
        overwrite: replace a non-empty out_dir.
        eval_prompts: held-out prompts added to the fixed chat prompts: a .jsonl path (rows with
            `messages`, `text` or `prompt`) or a list of strings / message lists.
        tolerance: max |Δlogit| / max |logit| allowed; default by dtype (verify.TOLERANCE).
        device: where to run; default cuda when available, else cpu (computing in fp32 there).
        greedy_tokens: length of the greedy decodes compared per prompt (0 = logits only).

    Raises:
        H1tuneError: bad inputs, a refused adapter, or verification above tolerance (nothing published).
    """
    import torch

    from h1tune.export.verify import verification_prompts
    from h1tune.generate import stop_ids

    plan = plan_merge(base, adapter, out_dir, dtype=dtype, drop_bypassed=drop_bypassed, merge_into=merge_into,
                      quantized_base=quantized_base, overwrite=overwrite, tolerance=tolerance)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # On CPU, compute in fp32: bf16 matmuls there are ~100x slower, and fp32 compute of the stored
    # (possibly bf16) weights still checks exactly the values that ship.
    work_dtype = "float32" if device == "cpu" else plan.out_dtype
    device_map = None if device == "cpu" else device
    tokenizer, source = _tokenizer(plan)
    prompts = verification_prompts(tokenizer, eval_prompts)
    eos = stop_ids(tokenizer)
    notes = [] if tokenizer.chat_template else [
        f"the tokenizer from {source} has no chat template; verified on plain-text prompts"]

    report = _merge_in_workspace(plan, tokenizer, prompts, eos, notes, work_dtype=work_dtype, device_map=device_map,
                                 merge_into=merge_into, greedy=greedy_tokens, max_shard_size=max_shard_size)
    log.info("wrote %s", plan.out)
    return report


def _merge_in_workspace(plan: MergePlan, tokenizer, prompts, eos, notes: list[str], *, work_dtype: str, device_map,
                        merge_into: str, greedy: int, max_shard_size: str) -> MergeReport:
    """Build the references, write and verify the merge in a temporary sibling, publish it with one rename."""
    plan.out.parent.mkdir(parents=True, exist_ok=True)
    workspace = Path(tempfile.mkdtemp(prefix=f".{plan.out.name}.merging-", dir=plan.out.parent))
    try:
        adapter_dir = plan.adapter_dir
        if plan.bypassed:
            adapter_dir = write_filtered_adapter(plan.adapter_dir, plan.bypassed, workspace / "adapter")
            log.info("dropping LoRA weights on %s", ", ".join(f"{len(v)} mamba.{k}" for k, v in plan.bypassed.items()))
        base_cfg = ModelConfig(name_or_path=plan.base_path, dtype=work_dtype)
        refs = (_plain_references(base_cfg, adapter_dir, device_map, prompts, greedy, eos)
                if plan.quant == "none" else
                _qlora_references(plan, base_cfg, adapter_dir, device_map, prompts, greedy, eos, merge_into))
        staged = workspace / "model"
        _write_merged(plan, refs.peft_model, tokenizer, staged, max_shard_size)
        refs.peft_model = None
        report = _verify(plan, refs, staged, work_dtype, device_map, prompts, greedy, eos, merge_into, notes)
        (staged / REPORT_FILE).write_text(json.dumps(report.as_dict(), indent=2))
        publish_dir(staged, plan.out)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    return report


def _verify(plan: MergePlan, refs: References, staged: Path, work_dtype: str, device_map, prompts, greedy: int,
            eos, merge_into: str, notes: list[str]) -> MergeReport:
    """Reload the written checkpoint with plain transformers and compare it with the reference."""
    from h1tune.export.verify import compare, model_outputs

    log.info("verifying the written checkpoint (reloaded from disk)")
    shipped = _reload(staged, work_dtype, device_map)
    shipped_outputs = model_outputs(shipped, prompts, greedy, eos)
    del shipped
    verification = compare(refs.reference, shipped_outputs)
    if plan.quant != "none" and merge_into == "original":
        refs.drift = compare(refs.qlora, shipped_outputs)
        refs.drift_label = "drift of this merge from the QLoRA model it came from"
    if refs.adapter_effect.max_abs == 0.0:
        notes.append("the adapter does not change the logits (untrained? lora_B all zero?)")
    report = MergeReport(
        base=plan.base_name, adapter=str(plan.adapter_dir), out_dir=str(plan.out), dtype=plan.out_dtype,
        quantized_base=plan.quant, merge_into=merge_into if plan.quant != "none" else "original",
        reference=refs.label, verification=verification, tolerance=plan.tolerance,
        adapter_effect=refs.adapter_effect, drift=refs.drift, drift_label=refs.drift_label, dropped=plan.bypassed,
        notes=notes,
    )
    if not report.passed:
        raise H1tuneError(
            f"verification failed: the merged checkpoint differs from {refs.label} by "
            f"{verification.relative:.3g} of max |logit| (tolerance {plan.tolerance:.3g}); nothing was written to "
            f"{plan.out}.\n{report.format()}\nIf this dtype needs more slack, pass tolerance= (--tolerance); "
            "otherwise report it")
    return report


def _tokenizer(plan: MergePlan):
    """The tokenizer the merged model ships with (see adapters.checkpoint.tokenizer_source)."""
    from transformers import AutoTokenizer

    source = tokenizer_source(plan.adapter_dir, plan.base_path)
    try:
        return AutoTokenizer.from_pretrained(source), source
    except (OSError, ValueError) as exc:
        raise H1tuneError(f"cannot load a tokenizer from {source!r} ({exc}); the merged model ships with one") from None


def _load(cfg, device_map):
    from h1tune.model import load_model

    return load_model(cfg, device_map=device_map, announce=False).eval()


def _with_adapter(model, adapter_dir: Path):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False).eval()
    except (ValueError, RuntimeError, KeyError) as exc:
        raise H1tuneError(f"adapter: peft cannot attach {adapter_dir} to this base ({exc}); was it trained on "
                          "a different Falcon-H1 size? Pass base= (--base) with the right one") from None


def _reload(path: Path, dtype: str, device_map):
    """Plain transformers, as a user of the published checkpoint would load it."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), device_map=device_map).eval()
