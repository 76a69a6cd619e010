"""h1tune's torch kernels against mamba_ssm's real Triton kernels (interpreter, CPU): outputs, final
states and every gradient, on packed documents (length 1, chunk-straddling, chunk-aligned).

Errors are max|got - ref| / max|ref| per tensor. fp32 tolerance 2e-5 (measured: at most 1e-6;
both sides accumulate in fp32, in different orders). bf16 tolerance 3e-2 (measured: at most 1.5e-2):
both compute in fp32 from bf16 inputs and return bf16, but the real kernel also rounds some
intermediates to bf16 by design (it lands up to 1.3e-2 from float64, h1tune 5e-3). Each side is
also held to the float64 recurrence (outputs and gradients), so both cannot be wrong alike.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from h1tune.ssm import kernels, triton_sim

pytestmark = pytest.mark.triton

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
TRUTH_TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2}
NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
CHUNK = 16
# 40 tokens, chunk 16: a 1-token document mid-chunk (5) and at a chunk start (16), one ending on a chunk
# edge (6..15), one straddling a chunk edge (17..36), and a short last one.
LENGTHS = [5, 1, 10, 1, 20, 3]
HEADS, GROUPS, HEAD_DIM, D_STATE = 4, 2, 8, 16


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.detach().double()
    scale = float(ref.abs().max())
    assert scale > 0, "a comparison with an all-zero reference proves nothing"
    return float((got.detach().double() - ref).abs().max()) / scale


def seq_idx_of(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])[None]


def scan_inputs(length: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """As the mixer passes them: activations in the model dtype, A in fp32 (-exp(A_log.float()))."""
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "x": torch.randn(1, length, HEADS, HEAD_DIM, generator=g),
        "dt": torch.randn(1, length, HEADS, generator=g) * 0.5,
        "A": -(torch.rand(HEADS, generator=g) * 2 + 0.05),
        "B": torch.randn(1, length, GROUPS, D_STATE, generator=g),
        "C": torch.randn(1, length, GROUPS, D_STATE, generator=g),
        "D": torch.randn(HEADS, generator=g),
        "z": torch.randn(1, length, HEADS, HEAD_DIM, generator=g),
        "dt_bias": torch.randn(HEADS, generator=g),
        "initial_states": torch.randn(1, HEADS, HEAD_DIM, D_STATE, generator=g),
    }
    return {k: (v if k == "A" else v.to(dtype)) for k, v in inputs.items()}


def recurrence(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx=None, **_):
    """Token by token in float64, the state zeroed where seq_idx changes: the ground truth (differentiable)."""
    x, dt, A, B, C, D, z, dt_bias, state = (t.double() for t in (x, dt, A, B, C, D, z, dt_bias, initial_states))
    rep = HEADS // B.shape[2]
    dt = F.softplus(dt + dt_bias)
    B, C = B.repeat_interleave(rep, 2), C.repeat_interleave(rep, 2)
    ys = []
    for t in range(x.shape[1]):
        if seq_idx is not None and t and seq_idx[0, t] != seq_idx[0, t - 1]:
            state = torch.zeros_like(state)
        state = state * torch.exp(dt[:, t] * A)[..., None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None]
        ys.append(((state * C[:, t, :, None]).sum(-1) + D[:, None] * x[:, t]) * F.silu(z[:, t]))
    return torch.stack(ys, 1), state


def run_scan(fn, inputs: dict, seq_idx, weights: tuple[torch.Tensor, torch.Tensor]):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y, final = fn(**leaves, chunk_size=CHUNK, seq_idx=seq_idx, dt_softplus=True, return_final_states=True)
    (y.float().mul(weights[0]).sum() + final.float().mul(weights[1]).sum()).backward()
    return y, final, {k: v.grad for k, v in leaves.items()}


# bf16 on the packed case only: rounding does not depend on seq_idx, and each case costs ~7 s here.
@pytest.mark.parametrize("packed,dtype", [(True, torch.float32), (True, torch.bfloat16), (False, torch.float32)],
                         ids=["packed-fp32", "packed-bf16", "one-document-fp32"])
def test_scan_matches_the_real_kernel(real, record, dtype, packed):
    lengths = LENGTHS if packed else [37]  # 37: not a multiple of the chunk
    length = sum(lengths)
    seq_idx = seq_idx_of(lengths) if packed else None
    inputs = scan_inputs(length, dtype)
    g = torch.Generator().manual_seed(1)
    weights = (torch.randn(1, length, HEADS, HEAD_DIM, generator=g), torch.randn(1, HEADS, HEAD_DIM, D_STATE, generator=g))

    y_real, final_real, grads_real = run_scan(real.mamba_chunk_scan_combined, inputs, seq_idx, weights)
    y_ours, final_ours, grads_ours = run_scan(kernels.mamba_chunk_scan_combined, inputs, seq_idx, weights)
    exact = {k: v.double() for k, v in inputs.items()}  # the same (rounded) inputs, float64 from here on
    y_true, final_true, grads_true = run_scan(recurrence, exact, seq_idx, weights)

    name = f"scan ({'packed' if packed else 'one document'})"
    assert y_ours.dtype == y_real.dtype == dtype
    tensors = {"y": (y_ours, y_real, y_true), "final_state": (final_ours, final_real, final_true)}
    tensors |= {f"d{k}": (grads_ours[k], grads_real[k], grads_true[k]) for k in inputs}
    errors = {key: rel_err(ours, theirs) for key, (ours, theirs, _) in tensors.items()}
    for key, err in errors.items():
        record(f"{name}: h1tune vs real, {key}", NAMES[dtype], err, TOL[dtype])
    # Each side against the float64 recurrence (same rounded inputs), so both cannot be wrong alike.
    truth = {who: max(rel_err(t[i], t[2]) for t in tensors.values()) for i, who in enumerate(("h1tune", "real"))}
    for who, err in truth.items():
        record(f"{name}: {who} vs float64 recurrence (worst tensor)", NAMES[dtype], err, TRUTH_TOL[dtype])
    assert max(errors.values()) <= TOL[dtype], errors
    assert max(truth.values()) <= TRUTH_TOL[dtype], truth


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_gated_norm_matches_the_real_kernel(real, record, dtype, norm_before_gate):
    """The gated RMSNorm h1tune's torch path runs (transformers' FalconH1RMSNormGated, the mixer's
    `norm` when mamba_rms_norm) vs mamba_ssm's Triton rmsnorm_fn, which the fused kernel runs.
    The fused call always passes norm_before_gate=False; Falcon-H1 configs have mamba_norm_before_gate False."""
    from transformers.models.falcon_h1.modeling_falcon_h1 import FalconH1RMSNormGated

    tokens, dim, groups = 24, 32, 2
    g = torch.Generator().manual_seed(0)
    x, z = (torch.randn(tokens, dim, generator=g).to(dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(dim, generator=g)).to(dtype)
    dy = torch.randn(tokens, dim, generator=g)

    norm = FalconH1RMSNormGated(dim, eps=1e-5, n_groups=groups, norm_before_gate=norm_before_gate).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
    xo, zo = x.clone().requires_grad_(), z.clone().requires_grad_()
    ours = norm(xo[None], zo[None])[0]
    ours.float().mul(dy).sum().backward()

    xr, zr, wr = x.clone().requires_grad_(), z.clone().requires_grad_(), weight.clone().requires_grad_()
    theirs = real.rmsnorm_fn(xr, wr, None, z=zr, eps=1e-5, group_size=dim // groups, norm_before_gate=norm_before_gate)
    theirs.float().mul(dy).sum().backward()

    errors = {"out": rel_err(ours, theirs), "dx": rel_err(xo.grad, xr.grad), "dz": rel_err(zo.grad, zr.grad),
              "dweight": rel_err(norm.weight.grad, wr.grad)}
    tol = TOL[dtype]
    for key, err in errors.items():
        record(f"gated norm (norm_before_gate={norm_before_gate}): h1tune path vs real, {key}", NAMES[dtype], err, tol)
    assert max(errors.values()) <= tol, errors


def test_conv_matches_the_per_document_conv_of_the_fused_runs(record):
    """causal-conv1d is CUDA C++: no real conv runs here. The fused runs in test_fused_path.py use
    triton_sim's per-document torch conv in its place; this pins h1tune's conv (outputs and every
    gradient) to that shim, so what those runs compare beyond it is the Triton code."""
    g = torch.Generator().manual_seed(0)
    lengths = LENGTHS
    x = torch.randn(2, 12, sum(lengths), generator=g)
    weight, bias = torch.randn(12, 4, generator=g), torch.randn(12, generator=g)
    seq_idx = seq_idx_of(lengths).expand(2, -1).contiguous()
    dout = torch.randn(x.shape, generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    ours = kernels.causal_conv1d_fn(*leaves, seq_idx=seq_idx, activation="silu")
    ours.mul(dout).sum().backward()
    shim = triton_sim.causal_conv1d_fwd_function(x, weight, bias, seq_idx, None, None, True)
    dx = torch.empty_like(x)
    dx_out, dweight, dbias, _ = triton_sim.causal_conv1d_bwd_function(x, weight, bias, dout, seq_idx, None, None, dx,
                                                                      False, True)
    assert dx_out is dx  # written in place, as the CUDA function does
    errors = {"out": rel_err(ours, shim), "dx": rel_err(leaves[0].grad, dx), "dweight": rel_err(leaves[1].grad, dweight),
              "dbias": rel_err(leaves[2].grad, dbias)}
    for key, err in errors.items():
        record(f"conv: h1tune vs per-document torch conv (shim), {key}", "fp32", err, TOL[torch.float32])
    assert max(errors.values()) <= TOL[torch.float32], errors
