"""The context-parallel conv, scan and attention equal the whole-row ops, values and gradients,
with the ranks simulated by threads in one process (no process group).

Each simulated rank runs in a thread; the all-gather stacks the tensors the threads deposit, so one
backward over every rank's output gives each input the gradient the real group's all-gather
backward sums. The layouts cover a document crossing a boundary, one starting exactly at a boundary,
one filling two whole slices (the state folds through them), and a slice of several documents; for
attention also short crossings (only the slices' tails gathered, one crossing in with a single local
token) and cuts that all fall between documents (nothing gathered).
"""

import threading

import pytest
import torch

from h1tune.context_parallel import attention, mamba, segments
from h1tune.ssm import kernels

WORLD, SLICE = 4, 20
# two rows of 80 tokens: row 0 crosses every boundary inside a document; in row 1 a document starts
# exactly at 20 and fills slices 1 and 2 (20..65)
LENGTHS = [[5, 30, 17, 28], [20, 45, 15]]
TOL = dict(atol=1e-5, rtol=1e-5)
# each slice ends in a document that goes on, but none spans a slice: ranks send their last 18 tokens;
# row 1's slice 1 is a 1-token end of a document, a 1-token document and an 18-token one
SHORT_CROSSINGS = [[5, 30, 17, 28], [10, 11, 1, 25, 33]]
NO_CROSSING = [[20, 7, 13, 20, 20], [20, 20, 1, 19, 20]]  # every cut between documents: nothing to gather
ATTENTION_LAYOUTS = {"whole_slices": (LENGTHS, SLICE), "short_crossings": (SHORT_CROSSINGS, 18),
                     "no_crossing": (NO_CROSSING, 0)}


class ThreadGroup:
    """A stand-in for a process group: rank = the calling thread's, all_gather = stack of all ranks'."""

    def __init__(self, world):
        self.world, self.barrier, self.slots, self.local = world, threading.Barrier(world), [None] * world, threading.local()

    def rank_and_size(self, group):
        return self.local.rank, self.world

    def all_gather(self, tensor, group):
        self.slots[self.local.rank] = tensor
        self.barrier.wait()
        stacked = torch.stack(self.slots)
        self.barrier.wait()  # nobody deposits the next gather's tensor before all have stacked this one
        return stacked

    def run(self, fn, per_rank):
        results, errors = [None] * self.world, []

        def target(rank):
            self.local.rank = rank
            try:
                results[rank] = fn(*per_rank[rank])
            except BaseException as exc:  # a failing rank must not leave the others at the barrier
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results


@pytest.fixture
def group(monkeypatch):
    sim = ThreadGroup(WORLD)
    for module in (mamba, attention):
        monkeypatch.setattr(module, "rank_and_size", sim.rank_and_size)
    for module in (mamba, attention, segments):
        monkeypatch.setattr(module, "all_gather", sim.all_gather)
    return sim


def _seg(lengths=LENGTHS):
    rows = [torch.cat([torch.full((n,), d) for d, n in enumerate(row)]) for row in lengths]
    return kernels.segment_ids(torch.stack(rows)).to(torch.int32)  # (2, 80)


def _slices(t, dim):
    return t.split(SLICE, dim=dim)


def _scan_inputs():
    gen = torch.Generator().manual_seed(0)
    b, L, h, p, g, n = 2, WORLD * SLICE, 4, 3, 2, 5
    x = torch.randn(b, L, h, p, generator=gen)
    dt = torch.randn(b, L, h, generator=gen) * 0.5
    A = -torch.empty(h).uniform_(0.01, 0.1, generator=gen)  # long memory: a lost state shows
    B, C = torch.randn(b, L, g, n, generator=gen), torch.randn(b, L, g, n, generator=gen)
    z = torch.randn(b, L, h, p, generator=gen)
    tensors = dict(x=x, dt=dt, A=A, B=B, C=C, z=z, dt_bias=torch.full((h,), -1.0), D=torch.randn(h, generator=gen))
    return {k: v.requires_grad_() for k, v in tensors.items()}


def _scan_whole(t):
    return kernels.mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], 8, D=t["D"], z=t["z"],
                                             dt_bias=t["dt_bias"], seq_idx=_seg(), dt_softplus=True,
                                             return_final_states=True)


def _scan_cp(group, t, carry=True):
    seq = _slices(_seg(), 1)
    cuts = [slice(r * SLICE, (r + 1) * SLICE) for r in range(WORLD)]
    per_rank = [[t["x"][:, s], t["dt"][:, s], t["B"][:, s], t["C"][:, s], t["z"][:, s], seq[r]]
                for r, s in enumerate(cuts)]

    def one(x, dt, B, C, z, seq_idx):
        return mamba.chunk_scan(x, dt, t["A"], B, C, 8, D=t["D"], z=z, dt_bias=t["dt_bias"], seq_idx=seq_idx,
                                dt_softplus=True, return_final_states=True, group=None, carry=carry)

    results = group.run(one, per_rank)
    return torch.cat([y for y, _ in results], dim=1), results[-1][1]


def _grads(outputs, tensors):
    weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(outputs)]
    loss = sum((o * w).sum() for o, w in zip(outputs, weights))
    return torch.autograd.grad(loss, list(tensors.values()))


def test_scan_equals_the_whole_row_values_final_state_and_gradients(group):
    tensors = _scan_inputs()
    y_whole, final_whole = _scan_whole(tensors)
    y_cp, final_cp = _scan_cp(group, tensors)
    torch.testing.assert_close(y_cp, y_whole, **TOL)
    torch.testing.assert_close(final_cp, final_whole, **TOL)  # the last rank's final state is the row's
    for name, got, want in zip(tensors, _grads([y_cp, final_cp], tensors), _grads([y_whole, final_whole], tensors)):
        torch.testing.assert_close(got, want, **TOL, msg=name)


def test_scan_without_carry_misses_the_state_from_earlier_slices(group):
    tensors = _scan_inputs()
    y_whole, _ = _scan_whole(tensors)
    y_cp, _ = _scan_cp(group, tensors, carry=False)
    lost = (y_cp - y_whole).abs().amax(dim=(2, 3))  # (rows, L)
    assert lost[0, :SLICE].max() < 1e-5  # rank 0 has nothing before it
    assert lost[0, SLICE:SLICE + 15].min() > 1e-3  # document 1 goes on past the first cut
    assert lost[1, SLICE:2 * SLICE].max() < 1e-5  # a document starting at the cut carries nothing in


def _conv_inputs():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, WORLD * SLICE, generator=gen).requires_grad_()
    weight = torch.randn(6, 4, generator=gen).requires_grad_()
    bias = torch.randn(6, generator=gen).requires_grad_()
    return {"x": x, "weight": weight, "bias": bias}


def _conv_cp(group, t, carry=True):
    per_rank = list(zip(_slices(t["x"], 2), _slices(_seg(), 1)))

    def one(x, seq_idx):
        return mamba.causal_conv1d(x, t["weight"], t["bias"], seq_idx=seq_idx, activation="silu", group=None,
                                   carry=carry)

    return torch.cat(group.run(one, per_rank), dim=2)


def test_conv_equals_the_whole_row_values_and_gradients(group):
    t = _conv_inputs()
    whole = kernels.causal_conv1d_fn(t["x"], t["weight"], t["bias"], seq_idx=_seg(), activation="silu")
    got = _conv_cp(group, t)
    torch.testing.assert_close(got, whole, **TOL)
    for name, g, w in zip(t, _grads([got], t), _grads([whole], t)):
        torch.testing.assert_close(g, w, **TOL, msg=name)
    control = _conv_cp(group, t, carry=False)
    assert (control - whole)[0, :, SLICE:SLICE + 3].abs().max() > 1e-2  # the halo taps are missing


class _Heads(torch.nn.Module):
    num_key_value_groups = 2  # 4 query heads over 2 key/value heads
    is_causal = True


def _attention_cp(group, q, k, v, seg):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    fn, module = attention.make_attention(sdpa_attention_forward, None), _Heads()
    per_rank = list(zip(_slices(q, 2), _slices(k, 2), _slices(v, 2), _slices(seg, 1)))
    return torch.cat(group.run(lambda q_, k_, v_, s_: fn(module, q_, k_, v_, None, scaling=0.3, seq_idx=s_)[0],
                               per_rank), dim=1)


def _qkv(seed=3):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"q": (2, 4, WORLD * SLICE, 8), "k": (2, 2, WORLD * SLICE, 8), "v": (2, 2, WORLD * SLICE, 8)}
    return {name: torch.randn(shape, generator=gen).requires_grad_() for name, shape in shapes.items()}


@pytest.mark.parametrize("layout", ATTENTION_LAYOUTS)
def test_attention_equals_per_document_causal_attention_over_the_row(group, layout):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths, tail = ATTENTION_LAYOUTS[layout]
    t, seg = _qkv(), _seg(lengths)
    assert attention.carried_tail(torch.stack(_slices(seg, 1))) == tail  # the gather path this layout takes
    mask = (seg[:, :, None] == seg[:, None, :]) & torch.ones(80, 80, dtype=torch.bool).tril()
    want, _ = sdpa_attention_forward(_Heads(), t["q"], t["k"], t["v"], mask[:, None], scaling=0.3)
    got = _attention_cp(group, t["q"], t["k"], t["v"], seg)
    torch.testing.assert_close(got, want, **TOL)
    for name, g, w in zip(t, _grads([got], t), _grads([want], t)):
        torch.testing.assert_close(g, w, **TOL, msg=name)


@pytest.mark.parametrize("layout", ATTENTION_LAYOUTS)
def test_attention_runs_the_key_value_gathers_backward_on_every_rank_or_on_none(group, monkeypatch, layout):
    """A real group's gather backward is an all_reduce: a rank that skipped it would hang the others.
    Rank 0's first document never continues from an earlier rank, yet its backward must reach it too."""
    forward, backward = [], []

    class Recorded(torch.autograd.Function):
        @staticmethod
        def forward(ctx, tensor):
            ctx.rank = group.local.rank
            forward.append(ctx.rank)
            return group.all_gather(tensor, None)

        @staticmethod
        def backward(ctx, grad):
            backward.append(ctx.rank)
            return grad[ctx.rank]

    monkeypatch.setattr(attention, "all_gather",
                        lambda t, g: Recorded.apply(t) if t.requires_grad else group.all_gather(t, g))
    t = _qkv()
    _grads([_attention_cp(group, t["q"], t["k"], t["v"], _seg(ATTENTION_LAYOUTS[layout][0]))], t)
    expected = [] if layout == "no_crossing" else list(range(WORLD))
    assert sorted(forward) == sorted(backward) == expected


def test_seq_idx_that_is_not_the_rows_segment_ids_is_refused(group):
    from h1tune.errors import H1tuneError

    t = _conv_inputs()
    raw = torch.zeros(2, WORLD * SLICE, dtype=torch.int32)
    raw[:, SLICE:] = 1
    raw[:, 2 * SLICE:] = 0  # a collator's reused ids: two documents would look like one
    with pytest.raises(H1tuneError, match="global segment ids"):
        group.run(lambda x, s: mamba.causal_conv1d(x, t["weight"], seq_idx=s, group=None),
                  list(zip(_slices(t["x"], 2), _slices(raw, 1))))


def test_enabled_routes_the_seam_and_attention_and_restores_them_on_error():
    import transformers.models.falcon_h1.modeling_falcon_h1 as mf
    from transformers.modeling_utils import AttentionInterface

    from h1tune import context_parallel as cp

    names = ("causal_conv1d_fn", "mamba2_chunk_scan", "mamba2_split_conv1d_scan_combined")
    before = {name: getattr(mf, name) for name in names}
    sdpa = AttentionInterface._global_mapping["sdpa"]
    with pytest.raises(RuntimeError, match="boom"):
        with cp.enabled(None):
            assert cp.is_enabled()
            assert mf.causal_conv1d_fn.func is mamba.causal_conv1d and mf.mamba2_chunk_scan.func is mamba.chunk_scan
            assert mf.mamba2_split_conv1d_scan_combined(None, None, None, None, None, None, 1) is None
            raise RuntimeError("boom")
    assert {name: getattr(mf, name) for name in names} == before
    assert AttentionInterface._global_mapping["sdpa"] is sdpa and not cp.is_enabled()


def test_enabled_refuses_a_model_whose_attention_it_would_not_replace():
    from types import SimpleNamespace

    from h1tune import context_parallel as cp
    from h1tune.errors import H1tuneError

    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="eager"))
    with pytest.raises(H1tuneError, match="attn_implementation='sdpa'"):
        with cp.enabled(None, model=model):
            pass
