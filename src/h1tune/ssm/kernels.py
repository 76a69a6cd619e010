"""Boundary-aware pure-torch stand-ins for the Mamba-2 kernels Falcon-H1 calls.

Each function has the calling convention of its CUDA kernel (`causal_conv1d`, `mamba_ssm`),
`seq_idx` included, so `h1tune.ssm.install()` can put it at the seam transformers already has
for those kernels. With `seq_idx` (one document id per token of a packed row) neither the
depthwise causal conv nor the SSD scan carries anything across a document boundary: the conv
drops taps from the previous document, and every decay that crosses a boundary is exactly zero.
Without `seq_idx` the results equal transformers' own torch path; the scan is also faster
(heads share B and C within a group, so we never repeat them per head; see bench/profile_mamba.py).

Everything runs in fp32 and returns the input's dtype, as the CUDA kernels do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_DEFAULT_DT_LIMIT = (0.0, float("inf"))
# The scan's result does not depend on its chunk size (only the fused kernel's tiling does). On a CPU
# 64-token chunks halve the quadratic within-chunk work of the model's 128 and measured 1.4x (0.5B
# shape) to 1.75x (tiny) faster forward+backward; 32 is slower again (more, smaller matmuls).
CPU_CHUNK_SIZE = 64


def segment_ids(seq_idx: torch.Tensor) -> torch.Tensor:
    """Monotonic segment ids (b, L): a new id wherever `seq_idx` changes between neighbours.

    Comparing these, not raw `seq_idx`, keeps two documents apart even if a collator reuses an id
    (e.g. ids that restart per row or alternate 0/1): a boundary is a change, as in the kernels.
    """
    seq_idx = seq_idx.reshape(seq_idx.shape[0], -1)
    changes = torch.zeros_like(seq_idx, dtype=torch.int64)
    changes[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]).to(torch.int64)
    return changes.cumsum(-1)


def _activate(out: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return out
    if activation in ("silu", "swish"):
        return F.silu(out)
    raise ValueError(f"causal conv activation must be None, 'silu' or 'swish', got {activation!r}")


def causal_conv1d_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    final_states_out: torch.Tensor | None = None,
    activation: str | None = None,
    **kwargs,
):
    """Depthwise causal conv over (b, d, L); with `seq_idx`, a tap never reads another document.

    `initial_states` (b, d, K-1) stand before the first token and belong to the first document.
    """
    _, dim, length = x.shape
    width = weight.shape[-1]
    xw = x.to(weight.dtype)
    if initial_states is None:
        padded = F.pad(xw, (width - 1, 0))
    else:
        padded = torch.cat([initial_states.to(weight.dtype), xw], dim=-1)

    if seq_idx is None:
        out = F.conv1d(padded, weight.unsqueeze(1), bias, groups=dim)
    else:
        # Tap j reads token t-j; it counts only if t-j is in t's document. Positions before the
        # row belong to the first document (they are zeros or its initial state).
        seg = segment_ids(seq_idx).to(x.device)
        seg_padded = F.pad(seg, (width - 1, 0), value=0)
        out = padded[..., width - 1 :] * weight[:, -1, None]
        for j in range(1, width):
            same = (seg_padded[:, width - 1 - j : width - 1 - j + length] == seg).unsqueeze(1)
            out = out + padded[..., width - 1 - j : width - 1 - j + length] * weight[:, -1 - j, None] * same
        if bias is not None:
            out = out + bias[:, None]
    out = _activate(out, activation).to(x.dtype)

    if not return_final_states:
        return out
    final = padded[..., -(width - 1) :].to(x.dtype) if width > 1 else padded[..., :0].to(x.dtype)
    if final_states_out is not None:
        final_states_out.copy_(final)
        final = final_states_out
    return out, final


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    cache_seqlens: torch.Tensor | None = None,
    conv_state_indices: torch.Tensor | None = None,
    **kwargs,
):
    """Decode step(s): conv over the cached window plus the new tokens; updates `conv_state` in place.

    Decoding has one document per row, so there is no boundary to respect here.
    """
    if cache_seqlens is not None or conv_state_indices is not None:
        raise NotImplementedError(
            "h1tune's torch causal_conv1d_update has no circular-buffer (cache_seqlens) or "
            "conv_state_indices support; Falcon-H1 in transformers never passes them"
        )
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(-1)
    dim, length = x.shape[1], x.shape[-1]
    state_len = conv_state.shape[-1]
    window = torch.cat([conv_state, x], dim=-1).to(weight.dtype)
    conv_state.copy_(window[..., -state_len:])
    out = F.conv1d(window, weight.unsqueeze(1), bias, groups=dim)[..., -length:]
    out = _activate(out, activation).to(x.dtype)
    return out.squeeze(-1) if squeeze else out


def mamba_split_conv1d_scan_combined(
    zxbcdt: torch.Tensor,
    conv1d_weight: torch.Tensor,
    conv1d_bias: torch.Tensor | None,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    chunk_size: int,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    dt_limit: tuple[float, float] = _DEFAULT_DT_LIMIT,
    return_final_states: bool = False,
    activation: str = "silu",
    rmsnorm_weight: torch.Tensor | None = None,
    rmsnorm_eps: float = 1e-6,
    outproj_weight: torch.Tensor | None = None,
    outproj_bias: torch.Tensor | None = None,
    headdim: int | None = None,
    ngroups: int = 1,
    norm_before_gate: bool = True,
    **kwargs,
):
    """Returns None, as transformers' fallback does: the mixer then runs the conv and the scan
    separately through the two functions above. On CPU fusing them buys nothing, and the unfused
    path calls `out_proj` as a module, so adapters on it keep training.
    """
    return None


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    state_batch_indices: torch.Tensor | None = None,
    **kwargs,
):
    """One recurrent decode step; updates `state` (b, h, p, n) in place and returns y like x.

    Shapes follow mamba_ssm: x, dt, z (b, h, p); A (h, p, n); B, C (b, g, n); D, dt_bias (h, p).
    """
    if state_batch_indices is not None:
        raise NotImplementedError("h1tune's torch selective_state_update has no state_batch_indices support")
    headless = x.dim() == 2  # mamba_ssm also accepts one head: x (b, d), state (b, d, n)
    if headless:
        state, x, dt, A = state.unsqueeze(1), x.unsqueeze(1), dt.unsqueeze(1), A.unsqueeze(0)
        B, C = B.unsqueeze(1), C.unsqueeze(1)
        D = D.unsqueeze(0) if D is not None else None
        z = z.unsqueeze(1) if z is not None else None
        dt_bias = dt_bias.unsqueeze(0) if dt_bias is not None else None
    heads, groups = x.shape[1], B.shape[1]
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    decay = torch.exp(dt[..., None] * A.float())  # (b, h, p, n)
    B = B.float().repeat_interleave(heads // groups, dim=1)[:, :, None, :]  # (b, h, 1, n)
    C = C.float().repeat_interleave(heads // groups, dim=1)[:, :, None, :]
    new_state = state.float() * decay + (dt * x.float())[..., None] * B
    state.copy_(new_state.to(state.dtype))
    y = (new_state * C).sum(-1)
    if D is not None:
        y = y + x.float() * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(x.dtype)
    return y.squeeze(1) if headless else y


def discretize_dt(
    dt: torch.Tensor,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = _DEFAULT_DT_LIMIT,
) -> torch.Tensor:
    """The scan's step sizes in fp32: dt + dt_bias, softplus, clamp to dt_limit.

    Shared so code that continues a scan (context parallelism) decays by exactly the scan's dt.
    """
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != _DEFAULT_DT_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _chunk(t: torch.Tensor, pad: int, chunk_size: int) -> torch.Tensor:
    """(b, L, ...) -> (b, chunks, chunk_size, ...), zero-padding the sequence end."""
    if pad:
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
    return t.reshape(t.shape[0], -1, chunk_size, *t.shape[2:])


def mamba_chunk_scan_combined(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = _DEFAULT_DT_LIMIT,
    return_final_states: bool = False,
    return_varlen_states: bool = False,
    **kwargs,
):
    """Chunked SSD scan (Mamba-2). With `seq_idx`, every document starts from zero state.

    Shapes follow mamba_ssm: x (b, L, h, p); dt (b, L, h); A (h,); B, C (b, L, g, n);
    D (h,) or (h, p); z like x; initial_states and the final state (b, h, p, n).

    Layout choice (why it is faster than transformers' torch scan): B and C stay per group and
    the h heads of a group ride along in one matmul dimension (r*p), so C·Bᵀ is computed once
    per group instead of once per head, and the chunk states come from one matmul per chunk.
    The inter-chunk recurrence is a loop over chunks, linear in their count (the segment-sum form
    is quadratic).
    """
    if return_varlen_states:
        raise NotImplementedError("h1tune's torch scan does not return per-document (varlen) states")
    batch, length, heads, head_dim = x.shape
    groups, d_state = B.shape[2], B.shape[3]
    rep = heads // groups
    Q = min(chunk_size, CPU_CHUNK_SIZE) if x.device.type == "cpu" else chunk_size
    pad = (-length) % Q
    n_chunks = (length + pad) // Q

    dt = discretize_dt(dt, dt_bias, dt_softplus, dt_limit)

    # The mixer hands x, B and C over as views of the conv's channels-first output (time is the
    # innermost stride); every op below runs along time, and on those views the scan took 3-4x longer.
    xf = x.float().contiguous()
    B, C = B.contiguous(), C.contiguous()
    xdt = _chunk(xf * dt[..., None], pad, Q)  # (b, c, Q, h, p)
    dA = _chunk(dt * A.float(), pad, Q).permute(0, 1, 3, 2)  # (b, c, h, Q)
    # float64 running sums: A_cum_l - A_cum_s cancels large numbers (hundreds after a long chunk),
    # and in float32 that costs ~1e-4 of relative precision in the decays; it is cheap at (b, c, h, Q).
    A_cum = torch.cumsum(dA.double(), dim=-1)
    Bc = _chunk(B.float(), pad, Q).permute(0, 1, 3, 2, 4)  # (b, c, g, Q, n)
    Cc = _chunk(C.float(), pad, Q).permute(0, 1, 3, 2, 4)

    if seq_idx is not None:
        seg = segment_ids(seq_idx).to(x.device)
        if pad:  # padding joins the last document
            seg = torch.cat([seg, seg[:, -1:].expand(batch, pad)], dim=1)
        seg = seg.reshape(batch, n_chunks, Q)
        seg_end = seg[..., -1]  # document alive at each chunk's end
        # document the incoming state belongs to; an initial state belongs to the first document
        seg_prev = torch.cat([seg[:, :1, 0], seg_end[:, :-1]], dim=1)

    # 1. Within-chunk outputs: y_l = sum_{s<=l, same doc} (C_l·B_s) exp(A_cum_l - A_cum_s) x_s dt_s.
    scores = Cc @ Bc.transpose(-1, -2)  # (b, c, g, Q, Q), shared by the heads of a group
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    visible = causal if seq_idx is None else causal & (seg[..., :, None] == seg[..., None, :])[:, :, None]
    # written as a sum so backward reduces the (Q, Q) gradient without negating it first
    log_decay = (A_cum[..., :, None] + (-A_cum)[..., None, :]).float()  # (b, c, h, Q, Q)
    decay = torch.exp(log_decay.masked_fill(~visible, -torch.inf))  # exactly 0 across a boundary
    mix = (decay.view(batch, n_chunks, groups, rep, Q, Q) * scores[:, :, :, None]).view(batch, n_chunks, heads, Q, Q)
    y_diag = mix @ xdt.permute(0, 1, 3, 2, 4)  # (b, c, h, Q, p)

    # 2. Each chunk's own end state: inputs decayed to the chunk end, only from the document alive there.
    to_end = torch.exp((A_cum[..., -1:] - A_cum).float())  # (b, c, h, Q)
    if seq_idx is not None:
        to_end = to_end * (seg == seg_end[..., None])[:, :, None]
    xw = (xdt * to_end.permute(0, 1, 3, 2)[..., None]).view(batch, n_chunks, Q, groups, rep * head_dim)
    chunk_states = Bc.transpose(-1, -2) @ xw.transpose(2, 3)  # (b, c, g, n, r*p)

    # 3. States entering each chunk, one chunk at a time; a state never decays across a boundary.
    carry = torch.exp(A_cum[..., -1].float())  # (b, c, h)
    if seq_idx is not None:
        carry = carry * (seg_prev == seg_end)[..., None]
    carry = carry.view(batch, n_chunks, groups, 1, rep, 1)
    chunk_states = chunk_states.view(batch, n_chunks, groups, d_state, rep, head_dim)
    if initial_states is None:
        state = torch.zeros_like(chunk_states[:, 0])
    else:  # (b, h, p, n) -> (b, g, n, r, p)
        state = initial_states.float().view(batch, groups, rep, head_dim, d_state).permute(0, 1, 4, 2, 3)
    entering = []
    # unbind, not [:, c]: each indexed view's backward wrote a zero tensor the size of all chunk states
    # (0.5B shape: 12.6 MB per chunk per layer, a quarter of a training step's time)
    for carry_c, chunk_state in zip(carry.unbind(1), chunk_states.unbind(1)):
        entering.append(state)
        state = state * carry_c + chunk_state
    states_in = torch.stack(entering, dim=1).view(batch, n_chunks, groups, d_state, rep * head_dim)

    # 4. Outputs from the incoming state, only for tokens still in the document it belongs to.
    from_start = torch.exp(A_cum.float())  # (b, c, h, Q)
    if seq_idx is not None:
        from_start = from_start * (seg == seg_prev[..., None])[:, :, None]
    y_off = (Cc @ states_in).view(batch, n_chunks, groups, Q, rep, head_dim)
    y_off = y_off * from_start.view(batch, n_chunks, groups, rep, Q).permute(0, 1, 2, 4, 3)[..., None]

    y = y_diag.permute(0, 1, 3, 2, 4) + y_off.permute(0, 1, 3, 2, 4, 5).reshape(batch, n_chunks, Q, heads, head_dim)
    y = y.reshape(batch, n_chunks * Q, heads, head_dim)[:, :length]
    if D is not None:
        y = y + xf * (D.float()[:, None] if D.dim() == 1 else D.float())
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(x.dtype).contiguous()  # callers .view() the result, as they do the kernel's

    if not return_final_states:
        return y
    final = state.permute(0, 1, 3, 4, 2).reshape(batch, heads, head_dim, d_state)
    return y, final
