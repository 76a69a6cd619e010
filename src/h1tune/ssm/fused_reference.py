"""A pure-torch stand-in for mamba_ssm's fused `mamba_split_conv1d_scan_combined`, for CPU checks.

    from h1tune.ssm import fused_reference
    with fused_reference.fused_kernel_installed():
        model.train(); model(ids, use_cache=False)

It has the real kernel's calling convention: FalconH1Mixer hands it `conv1d.weight` and
`out_proj.weight` as raw tensors, so any LoRA wrapped around those modules is bypassed exactly as
on a GPU with mamba_ssm. Installed where transformers looks it up: the module attribute
`mamba2_split_conv1d_scan_combined` of transformers' modeling_falcon_h1. Used by the unit tests
(tests/unit/fused_double.py) and the GPU check's CPU dry run; never on a training path.
tests/kernels_sim runs the same checks on mamba_ssm's real kernel code (h1tune.ssm.triton_sim).
"""

from __future__ import annotations

import contextlib
import inspect

import torch.nn.functional as F
from transformers.models.falcon_h1 import modeling_falcon_h1 as mf

LABEL = "h1tune/ssm/fused_reference.py (pure-torch stand-in with mamba_ssm's signature)"


def mamba_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                     initial_states=None, seq_idx=None, dt_limit=(0.0, float("inf")),
                                     return_final_states=False, activation="silu", rmsnorm_weight=None,
                                     rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None,
                                     ngroups=1, norm_before_gate=True):
    """mamba_ssm's signature; zxbcdt = [z | x B C | dt] as Falcon-H1's in_proj lays it out (no d_mlp)."""
    if rmsnorm_weight is not None:
        raise NotImplementedError("the stand-in covers mamba_rms_norm=False (all h1tune presets)")
    if initial_states is not None or seq_idx is not None or return_final_states:
        raise NotImplementedError("the stand-in covers the plain training call only")
    batch, seqlen, _ = zxbcdt.shape
    nheads = A.shape[0]
    dim = nheads * headdim
    conv_dim = conv1d_weight.shape[0]
    dstate = (conv_dim - dim) // (2 * ngroups)
    z, xbc, dt = zxbcdt.split([dim, conv_dim, nheads], dim=-1)
    # Depthwise causal conv on the raw weight (conv1d.forward is never called, as in the kernel).
    xbc = F.conv1d(xbc.transpose(1, 2), conv1d_weight.unsqueeze(1), conv1d_bias,
                   padding=conv1d_weight.shape[-1] - 1, groups=conv_dim)[:, :, :seqlen]
    xbc = F.silu(xbc) if activation in ("silu", "swish") else xbc
    x, B, C = xbc.transpose(1, 2).split([dim, ngroups * dstate, ngroups * dstate], dim=-1)
    # The reference torch scan the mixer itself would use, so outputs match the torch path exactly.
    y = mf.mamba2_chunk_scan(
        x.reshape(batch, seqlen, nheads, headdim), dt, A, B.reshape(batch, seqlen, ngroups, dstate),
        C.reshape(batch, seqlen, ngroups, dstate), chunk_size=chunk_size, D=D, z=None, dt_bias=dt_bias,
        dt_softplus=True, dt_limit=dt_limit)
    y = y.reshape(batch, seqlen, -1) * F.silu(z)
    return F.linear(y.to(zxbcdt.dtype), outproj_weight, outproj_bias)


_PARAMS = tuple(inspect.signature(mamba_split_conv1d_scan_combined).parameters)


def _as_transformers_calls_it(*args, **kwargs):
    """transformers' hub-kernel wrapper passes only the kwargs the implementation declares."""
    return mamba_split_conv1d_scan_combined(*args, **{k: v for k, v in kwargs.items() if k in _PARAMS})


def install() -> str:
    """Put the stand-in where the mixer calls the fused kernel (for a process of its own); returns LABEL."""
    mf.mamba2_split_conv1d_scan_combined = _as_transformers_calls_it
    return LABEL


@contextlib.contextmanager
def fused_kernel_installed():
    original = mf.mamba2_split_conv1d_scan_combined
    mf.mamba2_split_conv1d_scan_combined = _as_transformers_calls_it
    try:
        yield _as_transformers_calls_it
    finally:
        mf.mamba2_split_conv1d_scan_combined = original
