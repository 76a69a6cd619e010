"""Context-parallel versions of the Mamba-2 mixer's two sequence ops: the causal conv and the SSD scan.

With the row cut into contiguous slices, one per rank, each op needs what lies before the slice:
- the depthwise conv reads the K-1 tokens before each token: rank r prepends the last K-1 pre-conv
  inputs of rank r-1 (a halo) and their segment ids, so taps still never cross a document;
- the scan's state at the slice start is the state rank r-1 ended with, if the document goes on.
  Each rank scans its slice from zero state, then the ranks exchange (final state, total decay)
  and each folds the earlier ranks' pairs in order into its incoming state h_in. The scan is
  linear in its state, so h_in adds y_t += exp(sum_{s<=t} dt_s A) (C_t · h_in) to the tokens of the
  slice's first document, and carries on into the final state as + exp(sum over slice) h_in when
  that document fills the slice.
Everything is differentiable: the gradients of a halo or a carried state reach the rank that made
them through the all-gather's backward (`collectives.py`). With `carry=False` (the control) both
ops run on the slice alone, as if each rank held a separate row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from h1tune.context_parallel.collectives import all_gather, rank_and_size
from h1tune.context_parallel.segments import gather_segments, local_segments
from h1tune.ssm import kernels

_DEFAULT_DT_LIMIT = (0.0, float("inf"))


def _previous(stack: torch.Tensor, rank: int, fill: torch.Tensor) -> torch.Tensor:
    """Slot rank-1 of a gathered stack, `fill` for rank 0, always through the stack so every rank's
    backward reaches the gather (rank 0 too: its slot of the result gets a zero gradient)."""
    return torch.cat([fill.unsqueeze(0), stack[:-1]])[rank]


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  seq_idx: torch.Tensor | None = None, initial_states: torch.Tensor | None = None,
                  return_final_states: bool = False, activation: str | None = None, *, group,
                  carry: bool = True, **kwargs) -> torch.Tensor:
    """`kernels.causal_conv1d_fn` on this rank's slice (b, d, L_slice), reading the previous rank's
    last K-1 inputs so the result equals the whole row's conv at these positions."""
    if initial_states is not None or return_final_states:
        raise NotImplementedError("context-parallel conv is for training: no initial or final conv states")
    halo_len = weight.shape[-1] - 1
    seg = local_segments(seq_idx, x, x.shape[-1])
    if not carry or halo_len == 0:
        return kernels.causal_conv1d_fn(x, weight, bias, seq_idx=seg, activation=activation)
    if x.shape[-1] < halo_len:
        raise ValueError(f"a context-parallel slice needs at least {halo_len} tokens for the conv halo, "
                         f"got {x.shape[-1]}; use fewer ranks or longer rows")
    rank, _ = rank_and_size(group)
    segs = gather_segments(seg, group)[..., -halo_len:]
    halo_seg = _previous(segs, rank, torch.full_like(segs[0], -1))  # -1: no document, taps dropped
    halos = all_gather(x[..., -halo_len:], group)
    halo = _previous(halos, rank, torch.zeros_like(halos[0]))
    out = kernels.causal_conv1d_fn(torch.cat([halo, x], dim=-1), weight, bias,
                                   seq_idx=torch.cat([halo_seg, seg], dim=-1), activation=activation)
    return out[..., halo_len:]


def incoming_states(stack: torch.Tensor, first: torch.Tensor, last: torch.Tensor,
                    state_shape: torch.Size, rank: int) -> torch.Tensor:
    """This rank's incoming SSM state (b, h, p, n), folded from every rank's (final, total decay).

    `stack` (world, b, h*p*n + h) holds each rank's zero-start final state and the decay of its
    last document over the whole slice (0 if a boundary lies inside); `first`/`last` (world, b) the
    segment ids at each slice's ends. A state crosses from rank r-1 to r only if they match.
    """
    world, rows = stack.shape[:2]
    finals = stack[..., : stack.shape[-1] - state_shape[1]].reshape(world, *state_shape)
    totals = stack[..., stack.shape[-1] - state_shape[1]:]
    states = [torch.zeros(state_shape, dtype=stack.dtype, device=stack.device)]
    for r in range(1, world):
        goes_on = (last[r - 1] == first[r]).to(stack.dtype).view(rows, 1, 1, 1)
        states.append((finals[r - 1] + totals[r - 1][..., None, None] * states[-1]) * goes_on)
    return torch.stack(states)[rank]  # the whole stack: every rank's backward reaches the gather


def state_output(h_in: torch.Tensor, C: torch.Tensor, log_decay: torch.Tensor, first_doc: torch.Tensor,
                 z: torch.Tensor | None = None) -> torch.Tensor:
    """What the incoming state adds to y (b, L, h, p): exp(log_decay_t) (C_t · h_in) on the slice's
    first document (heads share their group's C, head = group * rep + r as in the kernel)."""
    rows, length, groups, _ = C.shape
    heads, head_dim, d_state = h_in.shape[1:]
    per_group = h_in.reshape(rows, groups, heads // groups, head_dim, d_state)
    read = torch.einsum("blgn,bgrpn->blgrp", C.float(), per_group).reshape(rows, length, heads, head_dim)
    decay = torch.exp(log_decay).float() * first_doc[..., None]  # (b, L, h)
    out = read * decay[..., None]
    return out * F.silu(z.float()) if z is not None else out


def _scan_carry(y, final, dt, A, C, z, seg, dt_bias, dt_softplus, dt_limit, group):
    """y and the final state of a slice scanned from zero state, plus what the earlier ranks carry in."""
    rank, _ = rank_and_size(group)
    segs = gather_segments(seg, group)
    first, last = segs[..., 0], segs[..., -1]
    step = kernels.discretize_dt(dt, dt_bias, dt_softplus, dt_limit) * A.float()  # (b, L, h)
    # float64 running sums, as the kernel's: exp of a difference of large sums loses fp32 precision
    log_decay = torch.cumsum(step.double(), dim=1)
    whole = (first[rank] == last[rank]).to(final.dtype)[:, None]  # the last document fills the slice
    total = torch.exp(log_decay[:, -1]).to(final.dtype) * whole  # (b, h)
    stack = all_gather(torch.cat([final.flatten(1), total], dim=1), group)
    h_in = incoming_states(stack, first, last, final.shape, rank)
    first_doc = (seg == seg[:, :1]).to(torch.float32)
    y = (y.float() + state_output(h_in, C, log_decay, first_doc, z)).to(y.dtype)
    return y, final + total[..., None, None] * h_in


def chunk_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
               chunk_size: int, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
               dt_bias: torch.Tensor | None = None, initial_states: torch.Tensor | None = None,
               seq_idx: torch.Tensor | None = None, dt_softplus: bool = False,
               dt_limit: tuple[float, float] = _DEFAULT_DT_LIMIT, return_final_states: bool = False, *,
               group, carry: bool = True, **kwargs):
    """`kernels.mamba_chunk_scan_combined` on this rank's slice (shapes as there), continuing the
    state the earlier ranks' slices end with, so the result equals the whole row's scan here."""
    if initial_states is not None:
        raise NotImplementedError("context-parallel scan is for training: every row starts from zero state")
    seg = local_segments(seq_idx, x, x.shape[1])
    y, final = kernels.mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, seq_idx=seg, dt_softplus=dt_softplus,
        dt_limit=dt_limit, return_final_states=True, **kwargs)
    if carry:
        y, final = _scan_carry(y, final, dt, A, C, z, seg, dt_bias, dt_softplus, dt_limit, group)
    return (y, final) if return_final_states else y
