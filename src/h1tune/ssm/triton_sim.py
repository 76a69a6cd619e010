"""mamba_ssm's real Triton kernels on CPU, in Triton's interpreter: the loader and the shims it needs.

    bash scripts/test_kernels.sh                    # sets everything up, runs tests/kernels_sim
    from h1tune.ssm import triton_sim
    real = triton_sim.load()                        # raises TritonSimUnavailable, naming the install line
    y = real.mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size=16, seq_idx=seq_idx)

For tests (tests/kernels_sim) only; nothing on a training path imports it. The kernels
are mamba-ssm's own source (its unpacked sdist; never built or installed, never edited), run by
Triton's interpreter (`TRITON_INTERPRET=1`) on CPU tensors. What cannot run here stays with the GPU
run: causal-conv1d is CUDA C++, so the fused function gets a torch conv (shim 6, below), and
nothing here says anything about speed.

Each shim is written against the versions below; `load()` refuses others, since a shim that
quietly stops applying would turn a check of the real kernels into a check of something else.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from h1tune.errors import H1tuneError

MAMBA_SSM_VERSION = "2.3.2.post1"
TRITON_VERSION = "3.9.0"
TORCH_SERIES = "2.13"  # shims 3 and 4 are about torch's CPU build; written against 2.13.0+cpu
SOURCE_ENV = "H1TUNE_MAMBA_SSM_SRC"
REPO = Path(__file__).resolve().parents[3]
DEFAULT_SOURCE = REPO / ".kernels-src" / f"mamba_ssm-{MAMBA_SSM_VERSION}"
INSTALL_LINE = (
    "bash scripts/test_kernels.sh  (creates .venv-kernels: pip install torch==2.13.0, then "
    "pip install -e '.[test,kernels-sim]' (triton==3.9.0, einops); unpacks mamba-ssm "
    f"{MAMBA_SSM_VERSION}'s sdist into .kernels-src/; runs with TRITON_INTERPRET=1)"
)
# Shim 4's stand-in SM count. The backward kernels split work into about this many programs; a few
# (not one) keeps their cross-program reductions exercised, and few keeps the interpreter fast.
CPU_SM_COUNT = 4


class TritonSimUnavailable(H1tuneError):
    """The interpreter tier cannot run here (a package, the source or a version is missing)."""


@dataclass
class RealKernels:
    """The real mamba_ssm functions, loaded and shimmed; `versions` records what ran."""

    mamba_chunk_scan_combined: Callable
    mamba_split_conv1d_scan_combined: Callable
    rmsnorm_fn: Callable
    source: Path
    versions: dict[str, str] = field(default_factory=dict)

    def label(self) -> str:
        v = self.versions
        return (f"mamba_ssm {v['mamba_ssm']} Triton kernels in Triton {v['triton']}'s interpreter on CPU "
                f"(h1tune.ssm.triton_sim; conv: torch shim for causal-conv1d's CUDA functions)")


def _problem(what: str) -> TritonSimUnavailable:
    return TritonSimUnavailable(f"mamba_ssm's Triton kernels on CPU: {what}; set up with: {INSTALL_LINE}")


def _source_dir(source: str | os.PathLike | None) -> Path:
    path = Path(source or os.environ.get(SOURCE_ENV) or DEFAULT_SOURCE)
    if not (path / "mamba_ssm" / "ops" / "triton" / "ssd_combined.py").is_file():
        raise _problem(f"no mamba-ssm source at {path} ({SOURCE_ENV} or {DEFAULT_SOURCE})")
    found = _read_version(path / "mamba_ssm" / "__init__.py")
    if found != MAMBA_SSM_VERSION:
        raise _problem(f"the source at {path} is mamba-ssm {found}; the shims are written for {MAMBA_SSM_VERSION}")
    return path


def _read_version(init: Path) -> str | None:
    for line in init.read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return None


def _check_packages() -> dict[str, str]:
    import importlib.metadata as md

    versions = {}
    for name in ("torch", "triton", "einops"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            raise _problem(f"{name} is not installed") from None
    if versions["triton"] != TRITON_VERSION:
        raise _problem(f"triton {versions['triton']} is installed; the shims are written for {TRITON_VERSION}")
    if not versions["torch"].startswith(TORCH_SERIES + "."):
        raise _problem(f"torch {versions['torch']} is installed; the shims are written for torch {TORCH_SERIES}")
    return versions


# Shim 1: mamba_ssm/__init__.py imports selective_scan_cuda (a CUDA extension), tilelang and the
# models; none of that exists or is needed here. A bare package object whose __path__ is the source
# directory lets `import mamba_ssm.ops.triton.ssd_combined` run that module (and its own imports)
# without running the package's __init__.
def _bare_package(source: Path) -> None:
    existing = sys.modules.get("mamba_ssm")
    if existing is not None:
        if list(getattr(existing, "__path__", [])) != [str(source / "mamba_ssm")]:
            raise _problem(f"another mamba_ssm is already imported ({getattr(existing, '__path__', existing)})")
        return
    package = types.ModuleType("mamba_ssm")
    package.__path__ = [str(source / "mamba_ssm")]
    package.__version__ = MAMBA_SSM_VERSION
    package.__h1tune_triton_sim__ = True
    sys.modules["mamba_ssm"] = package


# Shim 2: a kernel with several autotune configs is timed per config through the GPU driver
# (RuntimeError "0 active drivers" on CPU). Keeping one config per kernel skips the timing: Triton
# runs a single config without benchmarking. We keep the smallest tiles: on these small shapes larger
# ones are mostly padding (a scan call measured 6.5 s with the smallest, 9.1 s with the largest), and
# small tiles split a chunk into several blocks, so the kernels' masking is exercised. Not
# MAMBA_DETERMINISTIC=1 (which also picks one config): it switches the backward to its deterministic
# workspace path, not the one a GPU runs by default. Applied only while mamba_ssm's modules are
# imported (their decorators build the Autotuners), then undone.
def _tile_area(config) -> int:
    product = 1
    for key, value in config.kwargs.items():
        if key.startswith("BLOCK_SIZE"):
            product *= value
    return product


@contextlib.contextmanager
def _one_autotune_config():
    from triton.runtime import autotuner

    original = autotuner.Autotuner.__init__

    @functools.wraps(original)
    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.configs = [min(self.configs, key=_tile_area)]

    autotuner.Autotuner.__init__ = init
    try:
        yield
    finally:
        autotuner.Autotuner.__init__ = original


# Shim 3: every launch is wrapped in `with torch.cuda.device(x.device.index)`; a CPU tensor's index is
# None, and torch 2.13's CPU build then fails in `_exchange_device(None)` ("'<' not supported between
# 'NoneType' and 'int'"; its CUDA build treats None/-1 as "no device"). We give the CPU build the same
# no-op for None and negative indices; any other index still reaches torch's own function.
def _patch_device_guard() -> None:
    import torch

    if getattr(torch.cuda._exchange_device, "_h1tune_triton_sim", False):
        return
    for name in ("_exchange_device", "_maybe_exchange_device"):
        original = getattr(torch.cuda, name)

        def guarded(device, _original=original):
            if device is None or device < 0:
                return -1
            return _original(device)

        guarded._h1tune_triton_sim = True
        setattr(torch.cuda, name, guarded)


# Shim 4: the backward kernels (and the gated norm's) size their grids from
# torch.cuda.get_device_properties(tensor.device).multi_processor_count, which fails for a CPU
# device. For CPU devices we answer CPU_SM_COUNT; CUDA devices still get torch's answer.
def _patch_device_properties() -> None:
    import torch

    if getattr(torch.cuda.get_device_properties, "_h1tune_triton_sim", False):
        return
    original = torch.cuda.get_device_properties

    def properties(device=None):
        if isinstance(device, torch.device) and device.type == "cpu":
            return types.SimpleNamespace(multi_processor_count=CPU_SM_COUNT, name="cpu (h1tune.ssm.triton_sim)")
        return original(device)

    properties._h1tune_triton_sim = True
    torch.cuda.get_device_properties = properties


# Shim 5 (Triton's, not mamba_ssm's): the interpreter stores bfloat16 as uint16 and its tl.dot only
# converts 8-bit float operands, so a bf16 dot multiplies bit patterns (results ~1e9; triton#11584,
# not fixed in 3.9.0: "we just don't support it yet"). mamba_ssm's kernels dot bf16 x, B, C in a bf16
# model. We convert bf16 operands to fp32 with the interpreter's own cast first; bf16 products are
# exact in fp32 and a GPU accumulates them in fp32, so this is the GPU's arithmetic.
def _patch_interpreter_bf16_dot() -> None:
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_h1tune_triton_sim", False):
        return
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a = self.cast_impl(a, tl.float32) if a.dtype.scalar == tl.bfloat16 else a
        b = self.cast_impl(b, tl.float32) if b.dtype.scalar == tl.bfloat16 else b
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot._h1tune_triton_sim = True
    builder.create_dot = create_dot


# Shim 6: mamba_split_conv1d_scan_combined calls causal-conv1d's causal_conv1d_fwd_function /
# causal_conv1d_bwd_function, which are CUDA C++ (causal-conv1d 1.7.0 even imports causal_conv1d_cuda
# unconditionally, so ssd_combined sees them as None). We put torch functions with their contract in
# ssd_combined's namespace: each document of a row convolved alone (zero history), so seq_idx means
# what the CUDA kernel makes it mean. The backward writes dx in place, as the CUDA one does: the
# caller keeps its own view when the strides match and never reads the returned tensor then.
def _documents(seq_idx, batch: int, length: int):
    """(row, start, end) of each run of equal seq_idx (the whole row when seq_idx is None)."""
    if seq_idx is None:
        return [(b, 0, length) for b in range(batch)]
    spans = []
    for b in range(batch):
        ids = seq_idx[b].tolist()
        start = 0
        for t in range(1, length + 1):
            if t == length or ids[t] != ids[t - 1]:
                spans.append((b, start, t))
                start = t
    return spans


def _conv_per_document(x, weight, bias, seq_idx, silu: bool):
    import torch
    import torch.nn.functional as F

    dim, width = weight.shape
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for b, start, end in _documents(seq_idx, x.shape[0], x.shape[-1]):
        piece = F.conv1d(F.pad(x[b : b + 1, :, start:end].float(), (width - 1, 0)), weight.float().unsqueeze(1),
                         None if bias is None else bias.float(), groups=dim)
        out[b : b + 1, :, start:end] = F.silu(piece) if silu else piece
    return out.to(x.dtype)


def causal_conv1d_fwd_function(x, weight, bias, seq_idx, initial_states, final_states_out, silu_activation):
    if initial_states is not None or final_states_out is not None:
        raise NotImplementedError("triton_sim's conv shim covers the training call (no initial/final conv states)")
    return _conv_per_document(x, weight, bias, seq_idx, silu_activation)


def causal_conv1d_bwd_function(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx,
                               return_dinitial_states, silu_activation):
    import torch

    if initial_states is not None or dfinal_states is not None or return_dinitial_states:
        raise NotImplementedError("triton_sim's conv shim covers the training call (no initial/final conv states)")
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (x, weight, bias) if t is not None]
        xg, wg = leaves[0], leaves[1]
        bg = leaves[2] if bias is not None else None
        out = _conv_per_document(xg, wg, bg, seq_idx, silu_activation)
        grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    if dx is None:
        dx = torch.empty_like(x)
    dx.copy_(grads[0])
    return dx, grads[1].to(weight.dtype), (grads[2].to(bias.dtype) if bias is not None else None), None


def _conv_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
             final_states_out=None, activation=None):
    """causal_conv1d_fn for mamba_ssm's reference functions (forward only)."""
    if return_final_states:
        raise NotImplementedError("triton_sim's conv shim returns no final states")
    return causal_conv1d_fwd_function(x, weight, bias, seq_idx, initial_states, None, activation in ("silu", "swish"))


@functools.cache
def _load(source: Path) -> RealKernels:
    versions = _check_packages()
    if os.environ.get("TRITON_INTERPRET", "1") != "1":
        raise _problem(f"TRITON_INTERPRET={os.environ['TRITON_INTERPRET']!r}; the kernels run only in the interpreter")
    # Triton reads the flag when a kernel is decorated (at mamba_ssm's import, below), not when triton is imported.
    os.environ["TRITON_INTERPRET"] = "1"
    # transformers binds each Mamba kernel when modeling_falcon_h1 is first imported, to mamba_ssm's if
    # `import mamba_ssm` works then. Imported first, its functions stay the torch fallbacks (as on any
    # CPU machine), and the real kernel reaches a model only where it is put (fused_kernel_installed).
    importlib.import_module("transformers.models.falcon_h1.modeling_falcon_h1")
    _bare_package(source)
    _patch_device_guard()
    _patch_device_properties()
    _patch_interpreter_bf16_dot()
    with _one_autotune_config():
        combined = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
        gated = importlib.import_module("mamba_ssm.ops.triton.layernorm_gated")
    for name in ("causal_conv1d_fwd_function", "causal_conv1d_bwd_function", "causal_conv1d_fn"):
        if not hasattr(combined, name):
            raise _problem(f"ssd_combined no longer has {name}, which shim 6 replaces")
    combined.causal_conv1d_fwd_function = causal_conv1d_fwd_function
    combined.causal_conv1d_bwd_function = causal_conv1d_bwd_function
    combined.causal_conv1d_fn = _conv_fn
    versions["mamba_ssm"] = MAMBA_SSM_VERSION
    return RealKernels(combined.mamba_chunk_scan_combined, combined.mamba_split_conv1d_scan_combined,
                       gated.rmsnorm_fn, source, versions)


def load(source: str | os.PathLike | None = None) -> RealKernels:
    """Import mamba_ssm's Triton kernels from its unpacked source, shimmed to run on CPU (cached).

    Raises:
        TritonSimUnavailable: a package, the source or a version is missing or other than the shims
            were written for; the message names the install line.
    """
    return _load(_source_dir(source).resolve())


def available(source: str | os.PathLike | None = None) -> str | None:
    """None when `load()` would succeed, else why not (the message names the install line)."""
    try:
        load(source)
    except TritonSimUnavailable as exc:
        return str(exc)
    return None


def _as_transformers_calls_it(fn: Callable) -> Callable:
    """transformers' kernel wrapper hands the real function only the keywords it declares (the mixer
    passes rmsnorm_eps=None when it has no norm, and whatever else its **kwargs carry)."""
    params = set(inspect.signature(fn).parameters)

    def call(*args, **kwargs):
        return fn(*args, **{k: v for k, v in kwargs.items() if k in params})

    call.__name__ = call.__qualname__ = fn.__name__
    call.h1tune_triton_sim = True
    return call


@contextlib.contextmanager
def fused_kernel_installed(real: RealKernels | None = None):
    """Falcon-H1's fused training call (FalconH1Mixer.forward -> mamba2_split_conv1d_scan_combined)
    goes to the real mamba_ssm function inside the block, as on a GPU with mamba_ssm installed."""
    module = install_fused_kernel(real)
    try:
        yield module.mamba2_split_conv1d_scan_combined
    finally:
        module.mamba2_split_conv1d_scan_combined = module._h1tune_triton_sim_original
        del module._h1tune_triton_sim_original


def install_fused_kernel(real: RealKernels | None = None) -> Any:
    """Put the real fused function where transformers' Falcon-H1 mixer looks it up; returns that module.

    For a process of its own (tests use `fused_kernel_installed()`, which undoes it).
    """
    import transformers.models.falcon_h1.modeling_falcon_h1 as mf

    real = real or load()
    if not hasattr(mf, "_h1tune_triton_sim_original"):
        mf._h1tune_triton_sim_original = mf.mamba2_split_conv1d_scan_combined
    mf.mamba2_split_conv1d_scan_combined = _as_transformers_calls_it(real.mamba_split_conv1d_scan_combined)
    return mf
