"""The reference model of DPO/KTO: what the policy's log-probabilities are compared against.

- LoRA / QLoRA with a new adapter: no reference model. TRL computes the reference log-probs with
  the adapter disabled, so the base weights serve both (no second copy; a test counts storages).
- LoRA continued from an SFT adapter (`model.adapter`): no reference model either; TRL keeps a
  frozen copy of the starting adapter (megabytes), so the reference is the SFT model itself.
- Full fine-tuning: a frozen copy of the model as loaded, made before the first step.
"""

from __future__ import annotations

import copy
from typing import Any

from h1tune.config import H1tuneConfig


def reference_model(cfg: H1tuneConfig, model: Any) -> Any | None:
    """None when TRL can derive the reference from the (PEFT) policy, else a frozen copy of `model`."""
    if cfg.adapter.method == "lora":
        return None
    reference = copy.deepcopy(model)  # the policy has not trained yet: the copy is the starting point
    reference.requires_grad_(False)
    return reference.eval()
