"""Adapters for Falcon-H1: LoRA/QLoRA (lora.py), full fine-tuning (full.py), applying either
(apply.py), proving each trains (probe.py), and reading a saved adapter (checkpoint.py).

    model = apply_adapter(load_model(cfg.model), cfg)
    report = probe_adapters(model, batch)          # raises ProbeError if an adapter is inert

What may be targeted is policy (h1tune.policy); this package applies it to loaded models.
"""

from h1tune.adapters.apply import apply_adapter, summarize_trainable
from h1tune.adapters.probe import ProbeError, ProbeReport, probe_adapters

__all__ = ["ProbeError", "ProbeReport", "apply_adapter", "probe_adapters", "summarize_trainable"]
