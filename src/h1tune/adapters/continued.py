"""Keep training a saved LoRA adapter (`model.adapter`): SFT -> DPO chaining, or more SFT.

    model:
      name_or_path: tiny
      adapter: runs/sft/final        # the adapter keeps training; its r, alpha and targets are kept

The adapter is loaded trainable onto the base (`model.name_or_path`), checked like any adapter
h1tune reads (safetensors, LoRA, no weights on modules the fused Mamba kernel bypasses). For DPO
the reference model is then the base *with this adapter* (TRL keeps a frozen copy of the adapter,
a few MB, not of the base weights), i.e. the SFT model, as DPO intends.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from h1tune.adapters.checkpoint import bypassed_in_adapter, read_adapter_config, refuse_bypassed
from h1tune.adapters.lora import prepare_kbit

if TYPE_CHECKING:
    from h1tune.config import H1tuneConfig

log = logging.getLogger("h1tune")


def load_trainable_adapter(model: Any, cfg: "H1tuneConfig", quantized: bool) -> Any:
    """The PeftModel of `model` with the adapter at `cfg.model.adapter`, trainable."""
    from peft import PeftModel

    path = Path(cfg.model.adapter).expanduser()
    saved = read_adapter_config(path)
    refuse_bypassed(path, bypassed_in_adapter(path))
    if quantized:
        model = prepare_kbit(model)
    peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=True)
    log.info("continuing LoRA adapter %s (r=%s, alpha=%s, trained on %s); its own r, alpha and targets apply, "
             "adapter.r / lora_alpha / target_modules are not used", path, saved.get("r"), saved.get("lora_alpha"),
             saved.get("base_model_name_or_path"))
    return peft_model
