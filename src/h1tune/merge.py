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
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from h1tune.errors import H1tuneError
from h1tune.verify import Comparison

log = logging.getLogger("h1tune")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RUN_CONFIG = "config.yaml"  # h1tune's resolved run config, saved beside the adapter (or one level up)
REPORT_FILE = "h1tune_merge.json"
OUTPUT_DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
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


# ---------------------------------------------------------------------------------------------
# Adapter inspection (no torch): what it targets, which of its weights sit on bypassed modules.

def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """adapter_config.json of a peft LoRA adapter saved as safetensors; errors say what is missing."""
    if not adapter_dir.is_dir():
        raise H1tuneError(f"adapter: {str(adapter_dir)!r} is not a directory; give the folder that holds "
                          f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    cfg_path = adapter_dir / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise H1tuneError(f"adapter: {adapter_dir} has no {ADAPTER_CONFIG}; is it a merged model or a run "
                          "directory? Give the folder written by save_pretrained of a peft adapter")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        pickled = (adapter_dir / "adapter_model.bin").is_file()
        raise H1tuneError(f"adapter: {adapter_dir} has no {ADAPTER_WEIGHTS}"
                          + ("; it has a pickled adapter_model.bin, which can run code when loaded: re-save it "
                             "with safetensors (peft save_pretrained(..., safe_serialization=True))" if pickled else ""))
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise H1tuneError(f"adapter: {cfg_path} is not valid JSON ({exc})") from None
    if config.get("peft_type") != "LORA":
        raise H1tuneError(f"adapter: {cfg_path} has peft_type {config.get('peft_type')!r}; h1tune merges LoRA "
                          "adapters (peft_type LORA) only")
    return config


def adapter_module_paths(adapter_dir: Path) -> dict[str, list[str]]:
    """Module path (relative to the model, e.g. model.layers.0.mamba.in_proj) -> its LoRA tensor keys."""
    from safetensors import safe_open

    modules: dict[str, list[str]] = {}
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as f:
        for key in f.keys():
            parts = key.split(".")
            cut = next((i for i, p in enumerate(parts) if p.startswith("lora_")), None)
            if cut is None:
                continue  # modules_to_save: full tensors, not LoRA factors
            path = ".".join(parts[:cut]).removeprefix("base_model.model.")
            modules.setdefault(path, []).append(key)
    return modules


def bypassed_in_adapter(adapter_dir: Path) -> dict[str, list[str]]:
    """LoRA'd modules of the adapter that the fused Mamba kernel bypasses, grouped by leaf name."""
    from h1tune.adapters import bypassed_reason

    found: dict[str, list[str]] = {}
    for path in adapter_module_paths(adapter_dir):
        if bypassed_reason(path):
            found.setdefault(path.rsplit(".", 1)[-1], []).append(path)
    return {leaf: sorted(paths, key=_natural) for leaf, paths in sorted(found.items())}


def refuse_bypassed(adapter_dir: Path, found: dict[str, list[str]]) -> None:
    from h1tune.adapters import BYPASSED_MODULES

    if not found:
        return
    lines = [f"adapter: {adapter_dir} has LoRA weights on modules that must not carry one:"]
    for leaf, paths in found.items():
        lines.append(f"  - mamba.{leaf} ({len(paths)} modules, e.g. {paths[0]}): {BYPASSED_MODULES[leaf]}")
    lines.append("Pass drop_bypassed=True (--drop-bypassed) to merge the rest without them, or retrain with "
                 "the default targets (attention, mamba in_proj, mlp)")
    raise H1tuneError("\n".join(lines))


def write_filtered_adapter(adapter_dir: Path, drop: dict[str, list[str]], dest: Path) -> Path:
    """Copy the adapter to `dest` without the LoRA weights of the `drop` modules.

    target_modules becomes a regex that matches exactly the modules still carrying weights, so peft
    neither wraps the dropped modules (its Mamba guard would refuse them) nor any module it has no
    weights for.
    """
    from safetensors.torch import load_file, save_file

    dropped = {p for paths in drop.values() for p in paths}
    modules = adapter_module_paths(adapter_dir)
    keep_keys = {k for path, keys in modules.items() if path not in dropped for k in keys}
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    kept = {k: v for k, v in tensors.items() if k in keep_keys or not any(p.startswith("lora_") for p in k.split("."))}
    if not any(k in keep_keys for k in kept):
        raise H1tuneError(f"adapter: {adapter_dir} has LoRA weights only on bypassed modules; nothing is left to merge")
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    remaining = sorted((p for p in modules if p not in dropped), key=_natural)
    config["target_modules"] = "(" + "|".join(re.escape(p) for p in remaining) + ")"
    config["layers_to_transform"] = None
    config["layers_pattern"] = None
    dest.mkdir(parents=True, exist_ok=True)
    save_file(kept, str(dest / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (dest / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return dest


def run_model_config(adapter_dir: Path):
    """The `model:` section of h1tune's config.yaml saved with the run (adapter dir or its parent), or None."""
    import yaml

    from h1tune.config import ModelConfig

    for path in (adapter_dir / RUN_CONFIG, adapter_dir.parent / RUN_CONFIG):
        if not path.is_file():
            continue
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            continue
        if isinstance(tree, dict) and isinstance(tree.get("model"), dict):
            try:
                return ModelConfig.model_validate(tree["model"])
            except Exception as exc:  # pydantic ValidationError; a foreign config.yaml is not ours to judge
                log.warning("ignoring %s: its model section is not an h1tune ModelConfig (%s)", path, exc)
    return None


def _natural(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


# ---------------------------------------------------------------------------------------------
# Output directory safety.

def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_out_dir(out_dir: Path, protected: list[Path], overwrite: bool) -> None:
    """Refuse to write into (or over) the base or adapter, or over a non-empty directory unless asked."""
    out = out_dir.resolve()
    for p in protected:
        p = p.resolve()
        if _inside(out, p):
            raise H1tuneError(f"out_dir: {out_dir} is inside {p}, which is an input of this merge; "
                              "choose a directory outside the base model and the adapter")
        if _inside(p, out):
            raise H1tuneError(f"out_dir: {out_dir} contains {p}, an input of this merge; writing there "
                              "(or --overwrite) would destroy it; choose another directory")
    if out.exists() and not out.is_dir():
        raise H1tuneError(f"out_dir: {out_dir} exists and is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise H1tuneError(f"out_dir: {out_dir} is not empty; choose another directory or pass overwrite=True "
                          "(--overwrite) to replace it")


def check_disk_space(out_dir: Path, needed: int) -> None:
    """The merged checkpoint is written before anything is removed, so all of it must fit."""
    parent = out_dir.resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise H1tuneError(f"out_dir: {parent} has {free / 2**30:.2f} GiB free; the merged checkpoint needs about "
                          f"{needed / 2**30:.2f} GiB. Free space, choose another disk, or a smaller --dtype")


def estimate_size(base_path: str, base_dtype: str, out_dtype: str) -> int | None:
    """Bytes of the merged safetensors, scaled from the base's files (None for a hub id not on disk)."""
    files = list(Path(base_path).glob("*.safetensors")) if Path(base_path).is_dir() else []
    if not files:
        return None
    size = sum(f.stat().st_size for f in files)
    scale = _DTYPE_BYTES[out_dtype] / _DTYPE_BYTES.get(base_dtype, 4)
    return int(size * scale * 1.05) + (64 << 20)  # headroom: headers, tokenizer, filesystem rounding


def publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished temporary directory into place; an old out_dir is removed only afterwards."""
    trash = None
    if out_dir.exists():
        trash = out_dir.with_name(f".{out_dir.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
        out_dir.replace(trash)
    tmp.replace(out_dir)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Quantized bases.

def copy_dequantized_weights(quantized_model, target_model) -> int:
    """Overwrite `target_model`'s Linear weights with the dequantized weights of `quantized_model`.

    The adapter was trained against these values (NF4 codes x absmax), not against the 16-bit
    originals. Module names are matched after dropping peft's `base_model.model.` / `.base_layer`.
    Returns how many Linears were replaced.
    """
    import bitsandbytes as bnb
    import torch

    count = 0
    for name, module in quantized_model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            from peft.utils.integrations import dequantize_bnb_weight

            weight = dequantize_bnb_weight(module.weight, state=module.state)
        else:
            continue
        path = name.removeprefix("base_model.model.").removesuffix(".base_layer")
        target = _plain_module(target_model, path)
        with torch.no_grad():
            target.weight.copy_(weight.to(target.weight.dtype).reshape(target.weight.shape))
        count += 1
    return count


def _plain_module(model, path: str):
    """The nn.Linear at `path` of a model that may be wrapped by peft (its base_layer when wrapped)."""
    root = model.base_model.model if hasattr(model, "peft_config") else model
    module = root.get_submodule(path)
    return getattr(module, "base_layer", module)


# ---------------------------------------------------------------------------------------------
# The merge.

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


def _tokenizer(adapter_dir: Path, base_path: str):
    """The adapter's own tokenizer when saved with it (its chat template is what trained), else the base's."""
    from transformers import AutoTokenizer

    source = str(adapter_dir) if (adapter_dir / "tokenizer_config.json").is_file() else base_path
    try:
        return AutoTokenizer.from_pretrained(source), source
    except (OSError, ValueError) as exc:
        raise H1tuneError(f"cannot load a tokenizer from {source!r} ({exc}); the merged model ships with one") from None


def merge_adapter(
    base: str | None,
    adapter: str,
    out_dir: str,
    *,
    dtype: str = "base",
    drop_bypassed: bool = False,
    merge_into: Literal["dequantized", "original"] = "dequantized",
    quantized_base: Literal["none", "4bit", "8bit"] | None = None,
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

    from h1tune.config import ModelConfig
    from h1tune.model import resolve_model_path
    from h1tune.verify import compare, default_tolerance, model_outputs, verification_prompts

    adapter_dir = Path(adapter)
    adapter_cfg = read_adapter_config(adapter_dir)
    base_name = base or adapter_cfg.get("base_model_name_or_path")
    if not base_name:
        raise H1tuneError(f"adapter: {adapter_dir / ADAPTER_CONFIG} names no base_model_name_or_path; pass base= "
                          "(--base) with the Falcon-H1 it was trained on")
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
    if quant not in ("none", "4bit", "8bit"):
        raise H1tuneError(f"quantized_base: must be none, 4bit or 8bit, got {quant!r}")
    if merge_into not in ("dequantized", "original"):
        raise H1tuneError(f"merge_into: must be 'dequantized' or 'original', got {merge_into!r}")
    base_dtype = _config_dtype(base_config)
    out_dtype = base_dtype if dtype == "base" else dtype
    if out_dtype not in OUTPUT_DTYPES:
        raise H1tuneError(f"dtype: must be base, {', '.join(OUTPUT_DTYPES)}; got {dtype!r}")
    tol = tolerance if tolerance is not None else default_tolerance(out_dtype)

    found = bypassed_in_adapter(adapter_dir)
    if found and not drop_bypassed:
        refuse_bypassed(adapter_dir, found)
    out = Path(out_dir)
    protected = [adapter_dir] + ([Path(base_path)] if Path(base_path).exists() else [])
    check_out_dir(out, protected, overwrite)
    needed = estimate_size(base_path, base_dtype, out_dtype)
    if needed is not None:
        check_disk_space(out, needed)

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # On CPU, compute in fp32: bf16 matmuls there are ~100x slower, and fp32 compute of the stored
    # (possibly bf16) weights still checks exactly the values that ship.
    work_dtype = "float32" if device == "cpu" else out_dtype
    device_map = None if device == "cpu" else device
    tokenizer, tokenizer_source = _tokenizer(adapter_dir, base_path)
    prompts = verification_prompts(tokenizer, eval_prompts)
    from h1tune.generate import stop_ids

    eos = stop_ids(tokenizer)
    notes: list[str] = []
    if not tokenizer.chat_template:
        notes.append(f"the tokenizer from {tokenizer_source} has no chat template; verified on plain-text prompts")

    out.parent.mkdir(parents=True, exist_ok=True)
    workspace = Path(tempfile.mkdtemp(prefix=f".{out.name}.merging-", dir=out.parent))
    staged = workspace / "model"
    try:
        effective_adapter = adapter_dir
        if found:
            effective_adapter = write_filtered_adapter(adapter_dir, found, workspace / "adapter")
            log.info("dropping LoRA weights on %s", ", ".join(f"{len(v)} mamba.{k}" for k, v in found.items()))

        base_cfg = ModelConfig(name_or_path=base_path, dtype=work_dtype)
        drift, drift_label = None, ""
        if quant == "none":
            peft_model = _with_adapter(_load(base_cfg, device_map), effective_adapter)
            reference = model_outputs(peft_model, prompts, greedy_tokens, eos)
            with peft_model.disable_adapter():
                adapter_effect = compare(reference, model_outputs(peft_model, prompts, greedy_tokens=0, eos_ids=eos))
            reference_label = "base + adapter (unmerged)"
        else:
            qcfg = (run_cfg or base_cfg).model_copy(update={
                "name_or_path": base_path, "quantization": quant,
                "dtype": run_cfg.dtype if run_cfg and run_cfg.dtype != "auto" else work_dtype})
            log.info("loading the base in %s exactly as in training (out_proj and lm_head kept whole)", quant)
            qmodel = _with_adapter(_load(qcfg, device_map or "cpu"), effective_adapter)
            qlora = model_outputs(qmodel, prompts, greedy_tokens, eos)
            with qmodel.disable_adapter():
                adapter_effect = compare(qlora, model_outputs(qmodel, prompts, greedy_tokens=0, eos_ids=eos))
            peft_model = _with_adapter(_load(base_cfg, device_map), effective_adapter)
            original = model_outputs(peft_model, prompts, greedy_tokens, eos)
            if merge_into == "dequantized":
                replaced = copy_dequantized_weights(qmodel, peft_model)
                log.info("replaced %d base Linears with their dequantized %s weights", replaced, quant)
                reference, reference_label = qlora, f"the QLoRA model ({quant} base + adapter)"
                drift = compare(qlora, original)
                drift_label = ("for comparison, merging into the original 16-bit weights instead would drift from "
                               "the QLoRA model by")
            else:
                reference, reference_label = original, "the 16-bit base + adapter (unmerged)"
            del qmodel
            gc.collect()

        merged = peft_model.merge_and_unload(safe_merge=True)
        del peft_model
        merged = merged.to(getattr(torch, out_dtype))
        for attr in ("quantization_method", "hf_quantizer"):
            if getattr(merged, attr, None) is not None:
                setattr(merged, attr, None)
        merged.config.dtype = getattr(torch, out_dtype)
        if needed is None:
            check_disk_space(out, sum(p.numel() for p in merged.parameters()) * _DTYPE_BYTES[out_dtype])
        log.info("writing the merged checkpoint (%s)", out_dtype)
        merged.save_pretrained(staged, safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(staged)
        del merged
        gc.collect()

        _check_config_untouched(base_config, staged)
        log.info("verifying the written checkpoint (reloaded from disk)")
        shipped = _reload(staged, work_dtype, device_map)
        shipped_outputs = model_outputs(shipped, prompts, greedy_tokens, eos)
        del shipped
        verification = compare(reference, shipped_outputs)
        if quant != "none" and merge_into == "original":
            drift = compare(qlora, shipped_outputs)
            drift_label = "drift of this merge from the QLoRA model it came from"
        if adapter_effect.max_abs == 0.0:
            notes.append("the adapter does not change the logits (untrained? lora_B all zero?)")

        report = MergeReport(
            base=str(base_name), adapter=str(adapter_dir), out_dir=str(out), dtype=out_dtype, quantized_base=quant,
            merge_into=merge_into if quant != "none" else "original", reference=reference_label,
            verification=verification, tolerance=tol, adapter_effect=adapter_effect, drift=drift,
            drift_label=drift_label, dropped=found, notes=notes,
        )
        if not report.passed:
            raise H1tuneError(
                f"verification failed: the merged checkpoint differs from {reference_label} by "
                f"{verification.relative:.3g} of max |logit| (tolerance {tol:.3g}); nothing was written to {out}.\n"
                f"{report.format()}\nIf this dtype needs more slack, pass tolerance= (--tolerance); otherwise report it")
        (staged / REPORT_FILE).write_text(json.dumps(report.as_dict(), indent=2))
        publish(staged, out)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    log.info("wrote %s", out)
    return report


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
