"""h1tune.ssm: boundary-aware Mamba-2 kernels against a float64 recurrence and transformers' torch path,
and the seam install() (idempotent, truthful is_installed, clear error when transformers moved it)."""

import pytest
import torch
import torch.nn.functional as F

import transformers.models.falcon_h1.modeling_falcon_h1 as mf
from h1tune import ssm
from h1tune.errors import H1tuneError
from h1tune.ssm import kernels, seam


def _hf(name):
    """transformers' own torch fallback behind the kernel wrapper."""
    fn = getattr(mf, name)
    fn = getattr(fn, "_h1tune_original", fn)
    return fn.__wrapped__


def _scan_inputs(length, heads=4, head_dim=8, groups=1, d_state=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(1, length, heads, head_dim, generator=g),
        dt=torch.randn(1, length, heads, generator=g) * 0.5,
        A=-(torch.rand(heads, generator=g) * 2 + 0.05),
        B=torch.randn(1, length, groups, d_state, generator=g),
        C=torch.randn(1, length, groups, d_state, generator=g),
        D=torch.randn(heads, generator=g),
        dt_bias=torch.randn(heads, generator=g),
    )


def _recurrence(x, dt, A, B, C, D, dt_bias, seq_idx=None, initial=None):
    """Token-by-token float64 SSM, state zeroed where seq_idx changes: the ground truth."""
    x, dt, A, B, C, D, dt_bias = (t.double() for t in (x, dt, A, B, C, D, dt_bias))
    _, length, heads, _ = x.shape
    rep = heads // B.shape[2]
    dt = F.softplus(dt + dt_bias)
    B, C = B.repeat_interleave(rep, 2), C.repeat_interleave(rep, 2)
    state = torch.zeros(x.shape[0], heads, x.shape[-1], B.shape[-1], dtype=torch.float64)
    if initial is not None:
        state = initial.double().clone()
    ys = []
    for t in range(length):
        if seq_idx is not None and t and seq_idx[0, t] != seq_idx[0, t - 1]:
            state = torch.zeros_like(state)
        state = state * torch.exp(dt[:, t] * A)[..., None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None]
        ys.append((state * C[:, t, :, None]).sum(-1) + D[:, None] * x[:, t])
    return torch.stack(ys, 1), state


# documents of 5, 1, 20, 1, 13 tokens with chunk 8: starts mid-chunk, spans chunks, ends on a chunk edge
LENGTHS = [5, 1, 20, 1, 13]
SEQ_IDX = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(LENGTHS)])[None]


@pytest.mark.parametrize("groups", [1, 2])
def test_packed_scan_matches_per_document_recurrence(groups):
    inp = _scan_inputs(sum(LENGTHS), groups=groups)
    initial = torch.randn(1, 4, 8, 16)
    y, final = kernels.mamba_chunk_scan_combined(
        **inp, chunk_size=8, dt_softplus=True, seq_idx=SEQ_IDX, initial_states=initial, return_final_states=True
    )
    want, want_final = _recurrence(**inp, seq_idx=SEQ_IDX, initial=initial)
    torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(final.double(), want_final, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("cpu_chunk", [kernels.CPU_CHUNK_SIZE, 16, 128])
def test_the_cpu_chunk_size_does_not_change_the_result(monkeypatch, cpu_chunk):
    """On CPU the scan caps the model's chunk size (faster); any chunk gives the recurrence's result."""
    monkeypatch.setattr(kernels, "CPU_CHUNK_SIZE", cpu_chunk)
    lengths = [70, 3, 150, 77]  # documents that start mid-chunk and span several chunks
    seq_idx = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])[None]
    inp = _scan_inputs(sum(lengths), groups=2)
    y = kernels.mamba_chunk_scan_combined(**inp, chunk_size=128, dt_softplus=True, seq_idx=seq_idx)
    want, _ = _recurrence(**inp, seq_idx=seq_idx)
    torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("length,chunk,groups", [(37, 8, 1), (64, 16, 2), (3, 16, 1)])
def test_unpacked_scan_equals_transformers_forward_and_backward(length, chunk, groups):
    inp = _scan_inputs(length, groups=groups)
    leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
    ours = kernels.mamba_chunk_scan_combined(**leaves, chunk_size=chunk, dt_softplus=True)
    ours.pow(2).sum().backward()
    ref_leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
    x = ref_leaves.pop("x")
    theirs = _hf("mamba2_chunk_scan")(x, chunk_size=chunk, dt_softplus=True, **ref_leaves)
    theirs.pow(2).sum().backward()
    ref_leaves["x"] = x
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    for name in inp:
        torch.testing.assert_close(leaves[name].grad, ref_leaves[name].grad, atol=1e-4, rtol=1e-5, msg=name)


def test_packed_scan_gradients_equal_separate_documents():
    inp = _scan_inputs(sum(LENGTHS))
    packed = {k: v.clone().requires_grad_() for k, v in inp.items()}
    y = kernels.mamba_chunk_scan_combined(**packed, chunk_size=8, dt_softplus=True, seq_idx=SEQ_IDX)
    y.pow(2).sum().backward()
    alone = {k: v.clone().requires_grad_() for k, v in inp.items()}
    start, outs = 0, []
    for n in LENGTHS:
        part = {k: (v[:, start:start + n] if v.dim() > 1 else v) for k, v in alone.items()}
        outs.append(kernels.mamba_chunk_scan_combined(**part, chunk_size=8, dt_softplus=True))
        start += n
    torch.cat(outs, 1).pow(2).sum().backward()
    torch.testing.assert_close(y, torch.cat(outs, 1), atol=1e-5, rtol=1e-5)
    for name in inp:
        torch.testing.assert_close(packed[name].grad, alone[name].grad, atol=1e-4, rtol=1e-5, msg=name)


def test_packed_conv_never_reads_the_previous_document():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(1, 6, sum(LENGTHS), generator=g), torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    packed = kernels.causal_conv1d_fn(x, w, b, seq_idx=SEQ_IDX, activation="silu")
    start, alone = 0, []
    for n in LENGTHS:
        alone.append(_hf("causal_conv1d_fn")(x[..., start:start + n], w, b, activation="silu"))
        start += n
    torch.testing.assert_close(packed, torch.cat(alone, -1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        kernels.causal_conv1d_fn(x, w, b, activation="silu"), _hf("causal_conv1d_fn")(x, w, b, activation="silu")
    )


def test_decode_kernels_equal_transformers():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 6, 1, generator=g), torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    state = torch.randn(2, 6, 4, generator=g)
    ours_state, their_state = state.clone(), state.clone()
    torch.testing.assert_close(
        kernels.causal_conv1d_update(x, ours_state, w, b, activation="silu"),
        _hf("causal_conv1d_update")(x, their_state, w, b, activation="silu"),
    )
    torch.testing.assert_close(ours_state, their_state)

    heads, p, n = 4, 8, 16
    ssm_state = torch.randn(2, heads, p, n, generator=g)
    args = dict(
        hidden_states=torch.randn(2, heads, p, generator=g), dt=torch.randn(2, heads, p, generator=g),
        A=-torch.rand(heads, p, n, generator=g), B=torch.randn(2, 2, n, generator=g), C=torch.randn(2, 2, n, generator=g),
        D=torch.randn(heads, p, generator=g), z=torch.randn(2, heads, p, generator=g), dt_bias=torch.randn(heads, p, generator=g),
    )
    ours_state, their_state = ssm_state.clone(), ssm_state.clone()
    ours = kernels.selective_state_update(ours_state, *args.values(), dt_softplus=True)
    theirs = _hf("mamba2_selective_state_update")(their_state, dt_softplus=True, **args)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_state, their_state, atol=1e-5, rtol=1e-5)


def test_install_is_idempotent_truthful_and_reversible():
    ssm.uninstall()
    assert not ssm.is_installed()
    original = mf.mamba2_chunk_scan
    ssm.install()
    installed = mf.mamba2_chunk_scan
    ssm.install()
    assert ssm.is_installed() and mf.mamba2_chunk_scan is installed and installed is not original
    ssm.uninstall()
    assert not ssm.is_installed() and mf.mamba2_chunk_scan is original
    ssm.install()


def test_transformers_fallback_refuses_seq_idx_that_ours_accepts():
    """The reason the seam exists: without h1tune, seq_idx is an error on the torch path."""
    inp = _scan_inputs(8)
    x = inp.pop("x")
    with pytest.raises(ValueError, match="can't keep packed sequences apart"):
        getattr(mf.mamba2_chunk_scan, "_h1tune_original", mf.mamba2_chunk_scan)(
            x, chunk_size=8, seq_idx=torch.zeros(1, 8, dtype=torch.int32), **inp
        )


def test_install_names_a_missing_seam(monkeypatch):
    ssm.uninstall()
    monkeypatch.delattr(mf, "mamba2_chunk_scan")
    with pytest.raises(H1tuneError, match=r"(?s)modeling_falcon_h1\.mamba2_chunk_scan is missing.*transformers>=5.24"):
        ssm.install()
    monkeypatch.undo()
    ssm.install()


def test_install_names_a_changed_signature(monkeypatch):
    ssm.uninstall()
    monkeypatch.setattr(mf, "causal_conv1d_fn", lambda x, weight: x)
    with pytest.raises(H1tuneError, match="causal_conv1d_fn.*no longer has the parameters"):
        ssm.install()
    monkeypatch.undo()
    ssm.install()


def test_dispatcher_keeps_cpu_calls_on_the_torch_kernels_even_when_a_real_kernel_exists():
    calls = []
    dispatch = seam._make_dispatcher(lambda *a, **k: calls.append("ours"), lambda *a, **k: calls.append("real"), True)
    dispatch(torch.zeros(1))
    assert calls == ["ours"]
