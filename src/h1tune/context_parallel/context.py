"""Route Falcon-H1's sequence ops to their context-parallel versions while a block runs.

    with context_parallel.enabled(group, model=model):
        logits = model(input_ids=..., position_ids=..., seq_idx=..., use_cache=False).logits
        token_loss(logits, shift_labels, num_items_in_batch).backward()

While active, `modeling_falcon_h1`'s `causal_conv1d_fn` and `mamba2_chunk_scan` (looked up by the
mixer at call time) are the CP versions in `mamba.py`, its fused call returns None (so the mixer
takes those two), and "sdpa" in transformers' `AttentionInterface` is the CP attention. Everything
is restored on exit, error or not. Keep the block around backward too: gradient checkpointing
re-runs the forward there, and a re-run without CP would read the wrong context.
It affects every Falcon-H1 model of the process, as `h1tune.ssm.install()` does.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Iterator

from h1tune.context_parallel import attention, mamba
from h1tune.errors import H1tuneError
from h1tune.ssm import kernels

_MODULE = "transformers.models.falcon_h1.modeling_falcon_h1"
_ORIGINAL = "_h1tune_original"  # what h1tune.ssm's wrappers keep transformers' function under


def _seam_functions(group, carry: bool) -> dict:
    return {
        "causal_conv1d_fn": functools.partial(mamba.causal_conv1d, group=group, carry=carry),
        "mamba2_chunk_scan": functools.partial(mamba.chunk_scan, group=group, carry=carry),
        "mamba2_split_conv1d_scan_combined": kernels.mamba_split_conv1d_scan_combined,  # None: unfused path
    }


def _check_model(model) -> None:
    """CP attention replaces "sdpa" only; a model on eager or flash attention would skip it silently."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation != "sdpa":
        raise H1tuneError(
            f"context parallelism replaces the 'sdpa' attention function, but the model uses "
            f"attn_implementation={implementation!r}; load it with attn_implementation='sdpa'"
        )


@contextlib.contextmanager
def enabled(group, *, model=None, carry: bool = True) -> Iterator[None]:
    """Run Falcon-H1's conv, scan and attention across the ranks of `group` inside the block.

    Args:
        group: the context-parallel process group (gloo on CPUs); every rank holds one slice
            of the same rows (`split_packed_batch`) and runs the same forward and backward.
        model: checked to use "sdpa" attention, the function this replaces.
        carry: False drops the SSM state and conv halo carried between ranks (a control for tests:
            each slice then runs as if it were a row of its own); attention stays row-wide.
    """
    if model is not None:
        _check_model(model)
    from transformers.modeling_utils import AttentionInterface

    module = importlib.import_module(_MODULE)
    seam = _seam_functions(group, carry)
    saved = {name: getattr(module, name) for name in seam}
    saved_sdpa = AttentionInterface._global_mapping["sdpa"]
    sdpa = getattr(saved_sdpa, _ORIGINAL, saved_sdpa)  # transformers' own, not the per-document wrapper
    try:
        for name, function in seam.items():
            setattr(module, name, function)
        AttentionInterface.register("sdpa", attention.make_attention(sdpa, group))
        yield
    finally:
        for name, function in saved.items():
            setattr(module, name, function)
        AttentionInterface.register("sdpa", saved_sdpa)


def is_enabled() -> bool:
    """Whether a context-parallel block is active in this process."""
    import sys

    from transformers.modeling_utils import AttentionInterface

    return sys.modules.get(_MODULE) is not None and getattr(
        AttentionInterface._global_mapping.get("sdpa"), "context_parallel", False)
