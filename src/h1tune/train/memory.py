"""Will this run fit? An estimate of peak memory before training, and the checkpointing decision.

    plan = plan_memory(cfg, model, tokens_per_step=2 * 1024, precision=p)
    plan.checkpointing, plan.summary()

The defaults must fit the machine they run on: a 0.5B-shape LoRA step at 2x1024 tokens without
gradient checkpointing peaked near 21 GB on a 24 GB machine. `training.gradient_checkpointing: auto`
(the default) turns it on when the estimate without it would not fit comfortably, and a run that
would not fit even with it is refused with the numbers and what to change.
The activation factor is calibrated on Falcon-H1 (bench/memory_calibration.py prints the measured
peak next to this estimate); it is an estimate, stated as one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

GiB = 2**30
# Saved activations per token per decoder layer, in units of hidden_size elements: attention, the
# Mamba mixer (in_proj output is ~2.5x hidden, the scan's states and chunked intermediates) and the
# MLP. Calibrated: 0.5B shape, fp32, 2x1024 tokens, no checkpointing, ~19 GB above the weights.
ACTIVATION_FACTOR = 62
# With checkpointing, backward holds the recomputed layer with its gradients, and slack that does not grow
# with the length (the allocator's, the loss chunk's, the probe's): a 0.5B step at 2,048 tokens peaked at
# 7.9 GiB with non-reentrant checkpointing (bench/laptop_epoch.py), ~8 layers' worth at that length. So:
# 2 layers at the step's length + the other 6 counted at CALIBRATION_TOKENS. Counting all 8 at the length
# erred 5x at 32K (Tiny-90M: estimate 35.5 GiB, 7.0 GiB peak) and kept long runs from keeping freed memory.
RECOMPUTE_LAYERS = 8
RECOMPUTE_AT_LENGTH = 2
CALIBRATION_TOKENS = 2048
# Refusing a run uses an optimistic count (RECOMPUTE_FLOOR layers in all), so a run that may fit is
# tried; checkpointing is still decided with the cautious estimate.
RECOMPUTE_FLOOR = 2
FIT_FRACTION = 0.8  # use at most this share of the memory available when the run starts
RUNTIME_OVERHEAD = int(0.8 * GiB)  # interpreter, torch, libraries, data


@dataclass
class MemoryPlan:
    checkpointing: bool
    estimate: int  # bytes, with the chosen checkpointing
    without_checkpointing: int
    with_checkpointing: int
    available: int | None
    reason: str
    least: int = 0  # with checkpointing, counted optimistically (RECOMPUTE_FLOOR): what a refusal goes by

    def summary(self) -> str:
        avail = f"{self.available / GiB:.1f} GiB available" if self.available else "available memory unknown"
        return (f"memory estimate {self.estimate / GiB:.1f} GiB ({avail}; without gradient checkpointing "
                f"{self.without_checkpointing / GiB:.1f}, with {self.with_checkpointing / GiB:.1f}): {self.reason}")


def available_memory() -> int | None:
    """MemAvailable (Linux), else psutil's figure, else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


def estimate_bytes(model, tokens_per_step: int, checkpointing: bool, act_bytes: int,
                   logit_tokens: int | None = None, recompute_layers: int = RECOMPUTE_LAYERS) -> int:
    """Weights + trainable state + saved activations + logits + runtime, for one micro-batch of tokens.

    `logit_tokens`: tokens whose logits exist at once (SFT's chunked loss: one chunk; default all).
    Checkpointing never holds more than not checkpointing (a 4-layer model has no 8 layers to recompute).
    """
    config = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) * (4 + 4 + 8)  # fp32 grad + Adam
    hidden, layers = config.hidden_size, config.num_hidden_layers
    per_layer = tokens_per_step * ACTIVATION_FACTOR * hidden * act_bytes
    activations = per_layer * layers
    if checkpointing:  # layer inputs kept, one recomputed layer (and slack) at a time: never more than without
        at_length = min(recompute_layers, RECOMPUTE_AT_LENGTH)
        slack = (recompute_layers - at_length) * per_layer * min(1.0, CALIBRATION_TOKENS / tokens_per_step)
        kept_inputs = tokens_per_step * layers * hidden * act_bytes * 2
        activations = min(activations, kept_inputs + at_length * per_layer + int(slack))
    logits = min(tokens_per_step, logit_tokens or tokens_per_step) * config.vocab_size * 4 * 3  # fp32, softmax, grad
    return weights + trainable + activations + logits + RUNTIME_OVERHEAD


def plan_memory(requested, model, tokens_per_step: int, act_bytes: int = 4,
                available: int | None = None, logit_tokens: int | None = None) -> MemoryPlan:
    """Decide gradient checkpointing for `requested` (True, False or "auto") from the estimate."""
    available = available_memory() if available is None else available
    without = estimate_bytes(model, tokens_per_step, False, act_bytes, logit_tokens)
    with_ckpt = estimate_bytes(model, tokens_per_step, True, act_bytes, logit_tokens)
    budget = available * FIT_FRACTION if available else None
    if requested == "auto":
        on = budget is not None and without > budget
        reason = ("on: without it the run would not fit" if on else "off: the run fits without it (faster)")
    else:
        on, reason = bool(requested), f"{'on' if requested else 'off'} (training.gradient_checkpointing)"
    least = estimate_bytes(model, tokens_per_step, True, act_bytes, logit_tokens, RECOMPUTE_FLOOR)
    plan = MemoryPlan(on, with_ckpt if on else without, without, with_ckpt, available, reason, least)
    if available and plan.estimate > available:
        plan.reason += (f"; WARNING: the estimate exceeds the memory available (optimistically {least / GiB:.1f} "
                        "GiB; at long lengths it errs high)")
    return plan


def refusal(plan: MemoryPlan, tokens_per_step: int) -> str | None:
    """Why the run cannot fit even with checkpointing, with what to change; None when it may fit."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    if total and plan.least > total:
        return (f"this run needs about {plan.least / GiB:.1f} GiB even with gradient checkpointing, counted "
                f"optimistically, and the machine has {total / GiB:.1f} GiB: lower training.per_device_train_batch_size or "
                f"data.max_length ({tokens_per_step:,} tokens per step now), or use model.quantization: 4bit")
    return None
