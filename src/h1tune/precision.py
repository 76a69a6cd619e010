"""Training precision, decided by the hardware rather than the device type.

    p = training_precision(cfg)       # Precision(weights="bfloat16", autocast=True, reason="...")

CUDA: bf16. A CPU whose bf16 matmuls are really faster (it advertises AVX512-BF16 or AMX *and* a
short GEMM measured at start runs bf16 at least 1.3x fp32: on one EPYC fp32 176-182 GFLOP/s, bf16
404-411, a 0.5B-shape LoRA step 1.7x faster; on one Xeon with the same flag bf16 ran at 0.56x) trains
in bf16 too:
a LoRA's frozen base is stored in bf16 (half the memory, no per-step weight casts) while the
adapters and every optimiser state stay fp32 (peft keeps adapter weights fp32); full fine-tuning
keeps fp32 master weights under bf16 autocast. Other CPUs train in fp32: without native support
a bf16 matmul was measured ~100x slower there. fp16 on a CPU is always slow (0.4-1.0 GFLOP/s).
The Mamba scan's cumulative sums and the loss stay in fp32 or wider whatever is chosen. An fp32
LoRA run from a bf16 checkpoint keeps the frozen matmul weights bf16 (adapters/frozen_base.py).
`model.dtype: float32` forces fp32; H1TUNE_CPU_BF16=0 makes `auto` choose fp32 on every CPU
(the test suite's exactness checks use it).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
MIN_BF16_SPEEDUP = 1.3  # bf16 must beat fp32 GEMM by this much, measured, to be worth its rounding


@dataclass(frozen=True)
class Precision:
    weights: str  # dtype the base weights are loaded in
    autocast: bool  # run forward passes under bf16 autocast (the Trainer's bf16=True)
    reason: str

    def describe(self) -> str:
        mode = f"{self.weights} weights" + (", bf16 autocast" if self.autocast else "")
        return f"{mode} ({self.reason})"


@functools.lru_cache(maxsize=1)
def cpu_bf16_flag() -> str | None:
    """The CPU flag that advertises bf16 matmuls (Linux /proc/cpuinfo), or None."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return None
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return next((f for f in CPU_BF16_FLAGS if f in flags), None)
    return None


def cpu_model() -> str:
    """The CPU's model name and core count, for every benchmark header (numbers differ by CPU kind)."""
    import os
    import platform

    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
             if line.startswith("model name")]
    return f"{names[0] if names else platform.processor() or 'unknown CPU'}, {os.cpu_count()} cores"


@functools.lru_cache(maxsize=1)
def gemm_speeds(size: int = 1024, repeats: int = 4) -> tuple[float, float]:
    """(fp32, bf16) GFLOP/s of a size^3 matmul on this CPU, measured now (~0.1 s).

    The flag alone is not enough: one Xeon here advertises avx512_bf16 yet ran bf16 GEMM at 164
    GFLOP/s against 292 in fp32, while an EPYC ran bf16 at 2.3x fp32.
    """
    import time

    import torch

    speeds = []
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # warm-up: oneDNN picks its kernel on first use
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        speeds.append(2 * size**3 * repeats / (time.perf_counter() - start) / 1e9)
    return speeds[0], speeds[1]


def cpu_native_bf16() -> str | None:
    """Why this CPU should train in bf16 (its flag and the measured speed-up), or None."""
    if os.environ.get("H1TUNE_CPU_BF16", "").strip() == "0":
        return None
    flag = cpu_bf16_flag()
    if flag is None:
        return None
    fp32, bf16 = gemm_speeds()
    if bf16 < MIN_BF16_SPEEDUP * fp32:
        return None
    return f"{flag}, bf16 GEMM {bf16:.0f} vs fp32 {fp32:.0f} GFLOP/s measured"


def training_precision(cfg) -> Precision:
    """The weights' dtype and autocast for a training run of `cfg` (an H1tuneConfig)."""
    import torch

    dtype, cuda = cfg.model.dtype, torch.cuda.is_available()
    if dtype != "auto":
        on = "CUDA" if cuda else "CPU"
        return Precision(dtype, dtype == "bfloat16", f"model.dtype: {dtype} on {on}")
    if cuda:
        return Precision("bfloat16", True, "CUDA")
    flag = cpu_native_bf16()
    if flag is None:
        return Precision("float32", False, _why_fp32())
    if cfg.adapter.method == "full":
        return Precision("float32", True, f"CPU with {flag}; fp32 master weights for full fine-tuning")
    return Precision("bfloat16", True, f"CPU with {flag}; frozen base in bf16, LoRA weights and optimiser fp32")


def flush_denormals() -> None:
    """Treat subnormal floats (below 1.2e-38 in fp32) as zero on the CPU (FTZ/DAZ), as GPUs do.

    Gradients through the scan's decays and μP's small multipliers fall into that range, and x86
    handles subnormals in microcode: one backward matmul of the 0.5B-shape scan ran 54 ms instead of
    7, and a whole 1x1024-token step 18.3 s instead of 15.9 (bench/seq_scaling.py measures with it on).
    With Adam's eps (1e-8) a gradient that small moves no weight either way.
    """
    import torch

    torch.set_flush_denormal(True)  # False (nothing done) on CPUs without the instructions


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory(room: bool = True) -> bool:
    """Keep large tensors' memory in the process between steps (glibc: no mmap, no trimming below 2 GiB).

    glibc serves each allocation over 32 MiB with its own mmap and unmaps it on free, so every step
    pays page faults (the kernel zeroes each new page) for all of its large activations again. At long
    lengths that is most of what grows faster than linearly: a 32K-token tiny step took 40.3 s with glibc's
    default and 17.5 s with this, at 10.8 GiB peak RSS instead of 7.1 (bench/seq_scaling.py), so training
    applies it only when its memory plan leaves that `room` (train/run.py). Off when any MALLOC_* variable
    is set (the user chose), or H1TUNE_KEEP_MEMORY=0; H1TUNE_KEEP_MEMORY=1 applies it without `room`.
    Returns whether it was applied.
    """
    import ctypes
    import sys

    choice = os.environ.get("H1TUNE_KEEP_MEMORY", "").strip()
    if not sys.platform.startswith("linux") or choice == "0" or not (room or choice == "1"):
        return False
    if any(name.startswith("MALLOC_") for name in os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False


def _why_fp32() -> str:
    if os.environ.get("H1TUNE_CPU_BF16", "").strip() == "0":
        return "H1TUNE_CPU_BF16=0"
    if cpu_bf16_flag() is None:
        return "this CPU has no native bf16 (avx512_bf16/amx_bf16), where bf16 is far slower"
    fp32, bf16 = gemm_speeds()
    return (f"{cpu_bf16_flag()} present but bf16 GEMM measured {bf16:.0f} vs fp32 {fp32:.0f} GFLOP/s, under the "
            f"{MIN_BF16_SPEEDUP}x that bf16's rounding must buy")


def autocast(precision: Precision):
    """The autocast context training runs its forward passes in (a no-op when not autocasting)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16, enabled=precision.autocast)


def fp32_gap(model, batch: dict, precision: Precision) -> str | None:
    """How far bf16 autocast moves the loss on `batch` from fp32, when the weights are fp32 (one no-grad
    forward each). With a bf16 base there is no fp32 copy to compare against; `h1tune check --set
    model.dtype=float32` gives the fp32 loss."""
    import torch

    if not precision.autocast or precision.weights != "float32":
        return None
    from h1tune.lm.loss import shifted_cross_entropy

    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    labels = inputs.pop("labels")
    was_training = model.training
    model.eval()
    losses = []
    with torch.no_grad():
        for enabled in (False, True):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
                logits = model(**inputs, use_cache=False).logits
            losses.append(float(shifted_cross_entropy(logits, labels, reduction="mean")))
    model.train(was_training)
    return f"loss on the probe batch: bf16 autocast {losses[1]:.4f}, fp32 {losses[0]:.4f} (|Δ| {abs(losses[1] - losses[0]):.2e})"
