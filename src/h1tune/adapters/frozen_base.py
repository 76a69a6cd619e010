"""A LoRA's frozen base kept in the checkpoint's bf16 and computed in fp32, on CPUs that train in fp32.

Every Falcon-H1 checkpoint on the hub is bf16. Loading it in fp32 for an fp32 run doubles the
weights' memory (0.5B: 1.0 -> 2.0 GiB) and adds no information. Here the frozen matmul weights stay
bf16 and each matmul upcasts its weight on the fly: the products are the fp32 run's own (the same
fp32 values meet the same fp32 inputs), the backward saves only the bf16 weight, and every small or
trainable parameter (norms, conv, A_log, D, LoRA) is fp32. It costs one weight cast per matmul call.
(Tied weights: lm_head and embed_tokens share one tensor, stored once.)
"""

from __future__ import annotations

from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F


class _UpcastLinear(torch.autograd.Function):
    """y = x Wᵀ + b with a frozen low-precision W used at x's precision; saves W as stored."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad.matmul(weight.to(grad.dtype)), None, None


def _linear_forward(self, x):
    return _UpcastLinear.apply(x, self.weight, self.bias)


def _embedding_forward(self, ids):
    return F.embedding(ids, self.weight, self.padding_idx).float()


def applies(cfg: Any, precision: Any, checkpoint_dtype: Any) -> bool:
    """LoRA, unquantized, trained in plain fp32 (no autocast), from a bf16 checkpoint, `dtype: auto`."""
    return (cfg.adapter.method == "lora" and cfg.model.quantization == "none" and cfg.model.dtype == "auto"
            and precision.weights == "float32" and not precision.autocast
            and str(checkpoint_dtype).replace("torch.", "") == "bfloat16")


def store_frozen_in_bf16(model: Any) -> int:
    """After apply_adapter on the fp32-loaded model: frozen Linear/Embedding weights go back to the
    checkpoint's bf16 (lossless: they came from bf16) and compute in fp32; everything else stays fp32.
    Loading in fp32 first keeps peft's adapter initialisation the fp32 run's (on a bf16 base peft rounds
    the initial lora_A through bf16). Returns how many weight matrices it stored in bf16."""
    stored = set()
    for module in model.modules():
        kind, weight = type(module), getattr(module, "weight", None)
        if kind not in (torch.nn.Linear, torch.nn.Embedding) or weight.requires_grad:
            continue
        if weight.dtype == torch.float32:
            weight.data = weight.data.to(torch.bfloat16)
            stored.add(id(weight))
        if id(weight) in stored:  # a tied lm_head meets the embedding's tensor already stored
            module.forward = MethodType(_linear_forward if kind is torch.nn.Linear else _embedding_forward, module)
    return len(stored)


def keep_frozen_in_bf16(model: Any, cfg: Any, precision: Any) -> int:
    """Where `applies` (the checkpoint's config says bf16), store_frozen_in_bf16; 0 otherwise. The
    loaded model's config says fp32 by then, so the checkpoint's own config.json is read."""
    from h1tune.model import read_model_config

    if not applies(cfg, precision, read_model_config(cfg.model)[1].dtype):
        return 0
    return store_frozen_in_bf16(model)
