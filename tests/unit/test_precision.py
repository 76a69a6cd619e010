"""Training precision decided by the hardware: bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from h1tune import precision
from h1tune.config import load_config


@pytest.fixture()
def cpu_flags(monkeypatch, tmp_path):
    """Pretend /proc/cpuinfo lists `flags` and GEMM runs at `speeds` (fp32, bf16) GFLOP/s (and no CUDA)."""
    def use(flags: str, speeds: tuple[float, float] = (180.0, 410.0)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n")
        monkeypatch.setattr(precision, "Path", lambda _: info)
        monkeypatch.setattr(precision, "gemm_speeds", lambda: speeds)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.delenv("H1TUNE_CPU_BF16", raising=False)
        precision.cpu_bf16_flag.cache_clear()
    yield use
    precision.cpu_bf16_flag.cache_clear()


def test_native_bf16_cpu_trains_lora_with_a_bf16_base_and_full_ft_with_fp32_masters(cpu_flags):
    cpu_flags("avx512f avx512_bf16")
    lora = precision.training_precision(load_config(None))
    assert (lora.weights, lora.autocast) == ("bfloat16", True) and "avx512_bf16" in lora.reason
    assert "bf16 GEMM 410 vs fp32 180 GFLOP/s measured" in lora.reason
    full = precision.training_precision(load_config(None, ["adapter.method=full"]))
    assert (full.weights, full.autocast) == ("float32", True)
    forced = precision.training_precision(load_config(None, ["model.dtype=float32"]))
    assert (forced.weights, forced.autocast) == ("float32", False)


def test_cpu_without_native_bf16_or_with_the_override_trains_in_fp32(cpu_flags, monkeypatch):
    cpu_flags("avx512f")
    plain = precision.training_precision(load_config(None))
    assert (plain.weights, plain.autocast) == ("float32", False) and "no native bf16" in plain.reason
    cpu_flags("avx512_bf16", speeds=(292.0, 164.0))  # the flag, but bf16 measured slower (a Xeon here)
    slow = precision.training_precision(load_config(None))
    assert slow.weights == "float32" and "bf16 GEMM measured 164 vs fp32 292" in slow.reason
    cpu_flags("amx_bf16")
    monkeypatch.setenv("H1TUNE_CPU_BF16", "0")
    assert precision.training_precision(load_config(None)).weights == "float32"


def test_the_gemm_measurement_reports_both_speeds():
    fp32, bf16 = precision.gemm_speeds.__wrapped__(size=128, repeats=2)
    assert fp32 > 0 and bf16 > 0


def test_bf16_autocast_loss_gap_is_reported_for_fp32_weights():
    from h1tune.presets import build_model

    model = build_model("tiny", num_hidden_layers=1)
    ids = torch.randint(5, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    gap = precision.fp32_gap(model, {"input_ids": ids, "labels": ids}, precision.Precision("float32", True, "t"))
    bf16, fp32 = (float(part.split()[-1]) for part in gap.split("(")[0].split(":")[1].split(","))
    assert 0 < abs(bf16 - fp32) < 0.1  # bf16 moves the loss, a little
    assert precision.fp32_gap(model, {"input_ids": ids, "labels": ids},
                              precision.Precision("bfloat16", True, "t")) is None


def test_training_flushes_subnormals_to_zero_as_gpus_do():
    """x86 computes subnormals in microcode (a 0.5B step: 18.3 s with them, 15.9 s flushed)."""
    try:
        torch.set_flush_denormal(False)  # an earlier in-process training run may have turned it on
        subnormal = torch.tensor([1e-39])
        assert subnormal.mul(1.0).item() != 0.0
        precision.flush_denormals()
        assert subnormal.mul(1.0).item() == 0.0
        assert torch.tensor([1e-37]).mul(1.0).item() == pytest.approx(1e-37)  # normal floats untouched
    finally:
        torch.set_flush_denormal(False)


KEPT_PROBE = """
import os, sys, torch
from h1tune.precision import keep_freed_memory
def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
applied = keep_freed_memory(sys.argv[1] == "keep") if sys.argv[1] in ("keep", "no-room") else False
before = resident_mib()
x = torch.ones(64 * 2**20)  # 256 MiB, touched
del x
print(applied, round(resident_mib() - before))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_tensors_stay_in_the_process_unless_the_user_set_malloc(tmp_path):
    """Training keeps freed memory (no page faults for the next step's activations); glibc's default returns
    a 256 MiB tensor's pages at once; a MALLOC_* variable of the user's wins."""
    import subprocess

    def run(mode, **env):
        out = subprocess.run([sys.executable, "-c", KEPT_PROBE, mode], capture_output=True, text=True, check=True,
                             env={**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, **env})
        applied, kept_mib = out.stdout.split()
        return applied == "True", int(kept_mib)

    assert run("keep") == (True, pytest.approx(256, abs=16))
    assert run("default") == (False, pytest.approx(0, abs=16))
    assert run("keep", MALLOC_ARENA_MAX="2") == (False, pytest.approx(0, abs=16))
    # without room (the memory plan's call) only H1TUNE_KEEP_MEMORY=1 keeps it; =0 wins over room
    assert run("no-room") == (False, pytest.approx(0, abs=16))
    assert run("no-room", H1TUNE_KEEP_MEMORY="1") == (True, pytest.approx(256, abs=16))
    assert run("keep", H1TUNE_KEEP_MEMORY="0") == (False, pytest.approx(0, abs=16))
