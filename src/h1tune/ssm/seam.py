"""Put h1tune's boundary-aware Mamba-2 kernels at transformers' kernel seam for Falcon-H1.

transformers wraps five module-level functions of `modeling_falcon_h1` with
`use_kernel_func_from_hub_with_fallback`; `FalconH1Mixer.forward` looks them up by name at call
time and hands them its `**kwargs`, `seq_idx` included. The torch fallback behind that wrapper
refuses `seq_idx`, so packed training fails without mamba_ssm. `install()` replaces those five
attributes with dispatchers: a call whose tensors are on CUDA, where the wrapper found the real
kernel package, goes to the real kernel untouched; every other call goes to `h1tune.ssm.kernels`.

The attribute names and the fallbacks' signatures are checked first, so a transformers release
that moves the seam fails loudly here instead of silently leaking state across documents.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable
from types import ModuleType

from h1tune.errors import H1tuneError
from h1tune.ssm import kernels

SUPPORTED_TRANSFORMERS = ">=5.24,<5.25"
_MODULE = "transformers.models.falcon_h1.modeling_falcon_h1"

# attribute of modeling_falcon_h1 -> (our kernel, kernel package, parameters of transformers'
# torch fallback as of 5.24: the mixer calls it with these positions and keywords)
_SEAM: dict[str, tuple[Callable, str, tuple[str, ...]]] = {
    "causal_conv1d_fn": (
        kernels.causal_conv1d_fn, "causal_conv1d",
        ("hidden_states", "weight", "bias", "activation", "kwargs"),
    ),
    "causal_conv1d_update": (
        kernels.causal_conv1d_update, "causal_conv1d",
        ("hidden_states", "conv_state", "weight", "bias", "activation"),
    ),
    "mamba2_split_conv1d_scan_combined": (
        kernels.mamba_split_conv1d_scan_combined, "mamba_ssm",
        ("zxbcdt", "conv1d_weight", "conv1d_bias", "dt_bias", "A", "D", "chunk_size", "initial_states",
         "dt_limit", "return_final_states", "activation", "rmsnorm_weight", "rmsnorm_eps", "outproj_weight",
         "outproj_bias", "headdim", "ngroups", "norm_before_gate", "kwargs"),
    ),
    "mamba2_selective_state_update": (
        kernels.selective_state_update, "mamba_ssm",
        ("state", "hidden_states", "dt", "A", "B", "C", "D", "dt_bias", "dt_softplus", "z", "kwargs"),
    ),
    "mamba2_chunk_scan": (
        kernels.mamba_chunk_scan_combined, "mamba_ssm",
        ("hidden_states", "dt", "A", "B", "C", "chunk_size", "D", "dt_bias", "initial_states", "dt_softplus",
         "dt_limit", "return_final_states", "kwargs"),
    ),
}
_ORIGINAL = "_h1tune_original"


def _falcon_module() -> ModuleType:
    try:
        return importlib.import_module(_MODULE)
    except ImportError as exc:
        raise H1tuneError(
            f"exact packing needs transformers' Falcon-H1 ({_MODULE}), which failed to import: {exc}; "
            f"install transformers{SUPPORTED_TRANSFORMERS}"
        ) from exc


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _seam_problems(module: ModuleType) -> list[str]:
    """Every way this transformers differs from the seam h1tune was written against."""
    problems = []
    for name, (_, _, expected) in _SEAM.items():
        current = getattr(module, name, None)
        if current is None:
            problems.append(f"modeling_falcon_h1.{name} is missing")
            continue
        fallback = getattr(current, _ORIGINAL, current)
        params = tuple(inspect.signature(fallback).parameters)
        if params != expected:
            problems.append(f"modeling_falcon_h1.{name}{params} no longer has the parameters {expected}")
    for cls_name in ("FalconH1Mixer", "FalconH1DecoderLayer"):
        cls = getattr(module, cls_name, None)
        params = inspect.signature(cls.forward).parameters.values() if cls is not None else ()
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            problems.append(f"{cls_name}.forward no longer forwards **kwargs, so seq_idx cannot reach the kernels")
    return problems


def _uses_real_kernel(wrapped: Callable, package: str) -> bool:
    """Whether transformers' wrapper resolved to the kernel package rather than its torch fallback."""
    fn = wrapped
    while fn is not None:
        try:
            found = inspect.getclosurevars(fn).nonlocals.get("is_new_implementation")
        except TypeError:
            found = None
        if isinstance(found, bool):
            return found
        fn = getattr(fn, "__wrapped__", None)
    # A wrapper we cannot read: trust the package being importable, as transformers does.
    return importlib.util.find_spec(package) is not None


def _first_tensor(args: tuple, kwargs: dict):
    for value in (*args, *kwargs.values()):
        if hasattr(value, "is_cuda"):
            return value
    return None


def _make_dispatcher(ours: Callable, original: Callable, real_kernel: bool) -> Callable:
    if real_kernel:
        def dispatch(*args, **kwargs):
            tensor = _first_tensor(args, kwargs)
            if tensor is not None and tensor.is_cuda:  # seq_idx reaches mamba_ssm / causal_conv1d untouched
                return original(*args, **kwargs)
            return ours(*args, **kwargs)
    else:
        def dispatch(*args, **kwargs):
            return ours(*args, **kwargs)

    dispatch.__name__ = dispatch.__qualname__ = ours.__name__
    dispatch.__doc__ = ours.__doc__
    dispatch.__signature__ = inspect.signature(ours)
    setattr(dispatch, _ORIGINAL, original)
    dispatch.real_kernel = real_kernel
    return dispatch


def install() -> None:
    """Route Falcon-H1's Mamba kernel calls through h1tune's boundary-aware kernels (idempotent).

    Call once before the first packed forward; it affects every Falcon-H1 model in the process.
    Raises:
        H1tuneError: this transformers moved or changed the seam; names what changed.
    """
    module = _falcon_module()
    problems = _seam_problems(module)
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise H1tuneError(
            f"transformers {_transformers_version()} is not supported by h1tune's exact packing:\n{listed}\n"
            f"install transformers{SUPPORTED_TRANSFORMERS}, or train without packing"
        )
    for name, (ours, package, _) in _SEAM.items():
        current = getattr(module, name)
        if hasattr(current, _ORIGINAL):
            continue  # already ours
        setattr(module, name, _make_dispatcher(ours, current, _uses_real_kernel(current, package)))


def real_kernels_bound() -> bool:
    """Whether every seam function hands CUDA calls to mamba_ssm / causal_conv1d, as transformers resolved
    them (not merely whether the packages are importable: a partial build falls back to torch)."""
    module = _falcon_module()
    found = [getattr(getattr(module, name, None), "real_kernel", None) for name in _SEAM]
    if all(flag is None for flag in found):  # not installed: read transformers' own wrappers
        return all(_uses_real_kernel(getattr(module, name), package) for name, (_, package, _) in _SEAM.items())
    return all(bool(flag) for flag in found)


def uninstall() -> None:
    """Put transformers' own functions back (tests use it to show what leaks without h1tune)."""
    module = _falcon_module()
    for name in _SEAM:
        current = getattr(module, name, None)
        if current is not None and hasattr(current, _ORIGINAL):
            setattr(module, name, getattr(current, _ORIGINAL))


def is_installed() -> bool:
    """Whether all five seam attributes currently hold h1tune's dispatchers."""
    import sys

    module = sys.modules.get(_MODULE)
    if module is None:
        return False
    return all(hasattr(getattr(module, name, None), _ORIGINAL) for name in _SEAM)
