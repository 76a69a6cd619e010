"""Step 3, kernel part: h1tune's torch kernels (h1tune/ssm/kernels.py) against a reference, same inputs.

On a GPU the reference is the real kernel: mamba_ssm's SSD scan and selective_state_update,
causal_conv1d's conv and conv update, on identical CUDA tensors, with and without seq_idx, in
fp32 and bf16, at the 0.5B mixer's shape (24 heads x 64, d_state 128, chunk 128). In the dry run
there is no real kernel: without seq_idx the reference is transformers' torch fallback (the code
h1tune's kernels replace), with seq_idx it is h1tune's own kernel run on each document alone.
Tolerances on max|Δ| / max|ref|: fp32 5e-3 (Triton's dots run in TF32), bf16 3e-2.
"""

from __future__ import annotations

from gpu_steps.common import Ctx, rel_err

KERNEL_TOL = {"float32": 5e-3, "bfloat16": 3e-2}
# (batch, heads, head_dim, d_state, chunk, document lengths of each row)
SHAPES = {"cuda": (2, 24, 64, 128, 128, [100, 1, 250, 161]), "cpu": (2, 8, 32, 64, 32, [20, 1, 50, 25])}
CONV_WIDTH = 4


def _inputs(device: str, dtype: str) -> dict:
    import math

    import torch

    batch, heads, head_dim, d_state, chunk, lengths = SHAPES[device]
    length, dim = sum(lengths), heads * head_dim
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    dt_init = torch.exp(torch.empty(heads).uniform_(math.log(1e-3), math.log(1e-1), generator=g))
    t = {
        "x": rnd(batch, length, heads, head_dim), "dt": rnd(batch, length, heads) * 0.5,
        "A": -torch.exp(torch.empty(heads).uniform_(0.0, math.log(16.0), generator=g)),
        "B": rnd(batch, length, 1, d_state), "C": rnd(batch, length, 1, d_state), "D": rnd(heads),
        "dt_bias": dt_init + torch.log(-torch.expm1(-dt_init)),  # softplus^-1, as Mamba initialises it
        "conv_x": rnd(batch, length, dim),
        "conv_w": rnd(dim, CONV_WIDTH) * 0.5, "conv_b": rnd(dim) * 0.1,
        "step_x": rnd(batch, dim, 1), "conv_state": rnd(batch, dim, CONV_WIDTH),
        "ssm_state": rnd(batch, heads, head_dim, d_state) * 0.1, "z": rnd(batch, heads, head_dim),
        "step_B": rnd(batch, 1, d_state), "step_C": rnd(batch, 1, d_state),
        "step_dt": rnd(batch, heads, head_dim) * 0.5,
    }
    seq_idx = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])
    out = {k: v.to(device=device, dtype=getattr(torch, dtype)) for k, v in t.items()}
    out["A"] = t["A"].to(device)  # the mixer passes A = -exp(A_log.float()): always fp32
    out["conv_x"] = out["conv_x"].transpose(1, 2)  # (b, d, L) channel-last, as the mixer passes it
    out["seq_idx"] = seq_idx.expand(batch, -1).contiguous().to(device)
    return {**out, "chunk": chunk, "lengths": lengths}


def _calls(t: dict) -> dict:
    """kernel -> (call(fn, seq_idx) -> tensors to compare, takes seq_idx)."""
    a_step = t["A"][:, None, None].expand(-1, t["x"].shape[-1], t["B"].shape[-1])
    d_step = t["D"][:, None].expand(-1, t["x"].shape[-1])
    bias_step = t["dt_bias"][:, None].expand(-1, t["x"].shape[-1])
    return {
        "mamba_chunk_scan_combined": (lambda fn, s: [fn(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size=t["chunk"],
                                                        D=t["D"], z=None, dt_bias=t["dt_bias"], dt_softplus=True,
                                                        **({"seq_idx": s} if s is not None else {}))], True),
        "causal_conv1d_fn": (lambda fn, s: [fn(t["conv_x"], t["conv_w"], t["conv_b"], activation="silu",
                                               **({"seq_idx": s} if s is not None else {}))], True),
        "causal_conv1d_update": (lambda fn, s: _stateful(fn, t["conv_state"], lambda st: fn(
            t["step_x"], st, t["conv_w"], t["conv_b"], activation="silu")), False),
        "selective_state_update": (lambda fn, s: _stateful(fn, t["ssm_state"], lambda st: fn(
            st, t["x"][:, 0], t["step_dt"], a_step, t["step_B"], t["step_C"], d_step, z=t["z"], dt_bias=bias_step,
            dt_softplus=True)), False),
    }


def _stateful(fn, state, call) -> list:
    """Decode kernels update their state in place: compare the output and the new state."""
    fresh = state.clone()
    return [call(fresh), fresh]


def _ours() -> dict:
    from h1tune.ssm import kernels

    return {"mamba_chunk_scan_combined": kernels.mamba_chunk_scan_combined,
            "causal_conv1d_fn": kernels.causal_conv1d_fn,
            "causal_conv1d_update": kernels.causal_conv1d_update,
            "selective_state_update": kernels.selective_state_update}


def _real() -> dict:
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    return {"mamba_chunk_scan_combined": mamba_chunk_scan_combined, "causal_conv1d_fn": causal_conv1d_fn,
            "causal_conv1d_update": causal_conv1d_update, "selective_state_update": selective_state_update}


def _transformers_fallbacks() -> dict:
    """transformers' own functions at the seam (its torch path on CPU), under h1tune's dispatcher if installed."""
    import transformers.models.falcon_h1.modeling_falcon_h1 as mf

    def original(name):
        fn = getattr(mf, name)
        return getattr(fn, "_h1tune_original", fn)

    return {"mamba_chunk_scan_combined": original("mamba2_chunk_scan"),
            "causal_conv1d_fn": original("causal_conv1d_fn"),
            "causal_conv1d_update": original("causal_conv1d_update"),
            "selective_state_update": original("mamba2_selective_state_update")}


def _per_document(fn, call, t: dict, name: str) -> list:
    """h1tune's kernel on each document alone, concatenated: the dry run's reference with seq_idx."""
    import torch

    pieces, start = [], 0
    for n in t["lengths"]:
        part = dict(t)
        for key, dim in (("x", 1), ("dt", 1), ("B", 1), ("C", 1), ("conv_x", 2)):
            part[key] = t[key].narrow(dim, start, n)
        pieces.append(_calls(part)[name][0](fn, None)[0])
        start += n
    return [torch.cat(pieces, dim=2 if name == "causal_conv1d_fn" else 1)]


def kernel_rows(ctx: Ctx) -> tuple[list[list], list[str], list[str], dict]:
    """(rows, problems, notes, data) for every kernel, dtype and seq_idx setting."""
    ours = _ours()
    reference = _real() if ctx.cuda else _transformers_fallbacks()
    ref_label = "real kernel" if ctx.cuda else "transformers torch path"
    rows, problems, data = [], [], {}
    for dtype in ("float32", "bfloat16"):
        t = _inputs(ctx.device, dtype)
        for name, (call, takes_seq) in _calls(t).items():
            for seq in ((None, t["seq_idx"]) if takes_seq else (None,)):
                got = call(ours[name], seq)
                if seq is not None and not ctx.cuda:
                    want, label = _per_document(ours[name], call, t, name), "h1tune, each document alone"
                else:
                    want, label = call(reference[name], seq), ref_label
                err = max(rel_err(g.float(), w.float()) for g, w in zip(got, want))
                tol = KERNEL_TOL[dtype]
                what = f"{name}{' +seq_idx' if seq is not None else ''} vs {label}"
                rows.append(["kernel", what, dtype, err, tol, "", "ok" if err <= tol else "FAIL"])
                data[f"{dtype}/{name}/{'seq_idx' if seq is not None else 'plain'}"] = {
                    "rel_err": err, "tolerance": tol, "reference": label}
                if err > tol:
                    problems.append(f"kernel {what} {dtype}: {err:.2e} > {tol:.0e}")
    b, h, p, n, q, lengths = SHAPES[ctx.device]
    notes = [f"kernels: batch {b}, {h} heads x {p}, d_state {n}, chunk {q}, documents {'+'.join(map(str, lengths))}"]
    if not ctx.cuda:
        notes.append("dry run: no real kernels; references are transformers' torch path (no seq_idx) and h1tune's "
                     "kernel on each document alone (seq_idx)")
    return rows, problems, notes, data
