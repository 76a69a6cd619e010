"""Make a loaded Falcon-H1 trainable per `adapter:` (LoRA, QLoRA or full) and show what trains.

    model = apply_adapter(load_model(cfg.model), cfg)   # logs the per-group table
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from h1tune.adapters.full import freeze_for_full
from h1tune.adapters.lora import lora_config, prepare_kbit, resolve_targets
from h1tune.errors import ConfigError, H1tuneError
from h1tune.policy import param_group

if TYPE_CHECKING:
    from h1tune.config import H1tuneConfig

log = logging.getLogger("h1tune")


def _is_quantized(model: Any) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def apply_adapter(model: Any, cfg: "H1tuneConfig") -> Any:
    """Make `model` trainable per `cfg.adapter`: peft LoRA (k-bit prepared when quantized) or full FT.

    Returns the model to train (a PeftModel for LoRA) and logs the per-group table.
    """
    adapter = cfg.adapter
    if adapter.method == "full":
        # config.py refuses model.quantization with full; this catches a pre-quantized checkpoint.
        if _is_quantized(model):
            raise ConfigError("adapter.method: 'full' cannot train quantized base weights, and this checkpoint "
                              "is quantized; load its 16-bit original")
        frozen = freeze_for_full(model, adapter.freeze)
        log.info("full fine-tuning, %d parameter tensors frozen (%s)\n%s", len(frozen),
                 ", ".join(adapter.freeze) or "none", summarize_trainable(model))
        return model
    if cfg.model.adapter:  # an SFT run's adapter keeps training (adapters/continued.py)
        from h1tune.adapters.continued import load_trainable_adapter

        peft_model = load_trainable_adapter(model, cfg, quantized=_is_quantized(model))
        log.info("%s", summarize_trainable(peft_model))
        return peft_model
    from peft import get_peft_model

    names = resolve_targets(model, adapter)
    if _is_quantized(model):
        model = prepare_kbit(model)
    peft_model = get_peft_model(model, lora_config(adapter, names))
    wrapped = set(getattr(peft_model, "targeted_module_names", names))
    missing = [n for n in names if n not in wrapped and f"base_model.model.{n}" not in wrapped]
    if missing:
        raise H1tuneError(f"peft did not wrap {missing[:4]} although h1tune resolved them; report this with "
                          "your peft version")
    log.info("LoRA r=%d alpha=%g on %d modules\n%s", adapter.r, adapter.lora_alpha, len(names),
             summarize_trainable(peft_model))
    return peft_model


def summarize_trainable(model: Any) -> str:
    """A table of trainable parameters by group (LoRA: modules wrapped per target group)."""
    lora_modules: dict[str, set[str]] = {}
    rows: dict[str, list[int]] = {}  # group -> [trainable, total]
    total = trainable = 0
    for name, param in model.named_parameters():
        n = param.numel() * (2 if type(param).__name__ == "Params4bit" else 1)  # 4-bit packs two per byte
        total += n
        group = param_group(name)
        if ".lora_" in name:
            lora_modules.setdefault(group, set()).add(name.split(".lora_")[0])
        row = rows.setdefault(group, [0, 0])
        row[1] += n
        if param.requires_grad:
            row[0] += n
            trainable += n
    lines = [f"{'group':<12} {'modules':>8} {'trainable':>14} {'of params':>14}"]
    for group, (t, n) in rows.items():
        count = len(lora_modules.get(group, ())) or "-"
        lines.append(f"{group:<12} {count!s:>8} {t:>14,} {n:>14,}")
    pct = 100.0 * trainable / max(total, 1)
    lines.append(f"{'total':<12} {sum(len(v) for v in lora_modules.values()) or '-'!s:>8} {trainable:>14,} "
                 f"{total:>14,}  ({pct:.2f}% trainable)")
    return "\n".join(lines)
