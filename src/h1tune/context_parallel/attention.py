"""Context-parallel attention: one document at a time, the slice's first one with its earlier keys.

In a packed row a query sees only earlier keys of its own document, so a document that starts inside
this rank's slice needs nothing from other ranks: it runs alone through transformers' own SDPA
function with `is_causal=True`, as `h1tune.ssm.attention` does in one process (measured 2x faster than
one masked row there). Only the slice's first document can have begun on an earlier rank; its queries
see that document's keys and values from the earlier ranks, put in front of the local ones, under a
causal mask aligned to the bottom right (query i sees the p earlier keys and local keys 0..i). A rank
thus scores, per document, its queries against that document's keys only: masking one span of the
whole slice instead scored every document of the slice against every other and cost ~2x the step.

The ranks exchange keys and values through one all-gather (keys and values together) of the same
shape on every rank: each rank's last `tail` positions, `tail` being the longest run of a slice's
last document into the next slice (computed from the gathered document ids, so the same on every
rank; 0 when every cut falls between documents, and then nothing is gathered). Every rank's output
depends on the gathered stack, through an empty slice of it where its first document starts at its
own first token, so every rank runs the gather's backward, whose all_reduce returns the key/value
gradients of later ranks' queries to the rank that holds those keys.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from h1tune.context_parallel.collectives import all_gather, rank_and_size
from h1tune.context_parallel.segments import gather_segments, local_segments
from h1tune.ssm.attention import document_lengths


def carried_tail(segs: torch.Tensor) -> int:
    """How many of its last positions any slice must send on: over ranks and rows, the longest run of
    a slice's last document when that document goes on into the next slice (0: none does).

    A document spanning a whole slice makes this the slice length, so a document that started on any
    earlier rank reaches a later one through the tails of every rank in between.
    """
    last = segs[:-1, :, -1:]  # (world - 1, rows, 1): each slice's last document id
    goes_on = last[..., 0] == segs[1:, :, 0]
    runs = (segs[:-1] == last).sum(-1) * goes_on
    return int(runs.max()) if runs.numel() else 0


def earlier_lengths(segs: torch.Tensor, rank: int) -> list[int]:
    """Per row, how many tokens of this slice's first document lie on earlier ranks (0: it starts here)."""
    world, rows, length = segs.shape
    before = segs[:rank].permute(1, 0, 2).reshape(rows, rank * length)
    return (before == segs[rank][:, :1]).sum(-1).tolist()


def gather_tails(key: torch.Tensor, value: torch.Tensor, tail: int, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's last `tail` keys and values in rank order, (b, h_kv, world * tail, d) each."""
    split = key.shape[-1]
    stack = all_gather(torch.cat([key[:, :, -tail:], value[:, :, -tail:]], dim=-1), group)
    world, rows, heads, length, width = stack.shape
    row = stack.permute(1, 2, 0, 3, 4).reshape(rows, heads, world * length, width)
    return row[..., :split], row[..., split:]


def continued_attention(original: Callable, module, query, key, value, earlier_key, earlier_value, **kwargs):
    """One document's local queries over its earlier keys (p of them) followed by its local keys.

    The keys are concatenated even when p is 0: the empty slice keeps the gathered stack in the graph,
    so this rank's backward runs the gather's backward as every other rank's does.
    """
    key, value = torch.cat([earlier_key, key], dim=2), torch.cat([earlier_value, value], dim=2)
    q_len, k_len = query.shape[2], key.shape[2]
    if k_len == q_len:
        return original(module, query, key, value, None, is_causal=True, **kwargs)[0]
    mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    return original(module, query, key, value, mask[None, None], is_causal=False, **kwargs)[0]


def row_attention(original: Callable, module, query, key, value, lengths: list[int], earlier, **kwargs):
    """One row (batch 1): its first document through `continued_attention` when `earlier` holds keys
    and values to put in front, every other document alone with `is_causal=True`."""
    # split, not slices: a slice's backward writes a zero tensor of the whole input per document
    qs, ks, vs = (t.split(lengths, dim=2) for t in (query, key, value))
    parts = []
    for i, (q, k, v) in enumerate(zip(qs, ks, vs)):
        if i == 0 and earlier is not None:
            parts.append(continued_attention(original, module, q, k, v, *earlier, **kwargs))
        else:
            parts.append(original(module, q, k, v, None, is_causal=True, **kwargs)[0])
    return torch.cat(parts, dim=1)


def make_attention(original: Callable, group) -> Callable:
    """An "sdpa" attention function for `AttentionInterface` that attends across the group's slices."""

    def context_parallel_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        rank, _ = rank_and_size(group)
        seg = local_segments(kwargs.pop("seq_idx", None), query, query.shape[2])
        segs = gather_segments(seg, group)
        tail = carried_tail(segs)
        kwargs.pop("is_causal", None)  # set per document below
        kwargs.update(dropout=dropout, scaling=scaling)
        gathered = gather_tails(key, value, tail, group) if tail else None
        rows = []
        for r, (q, k, v, lengths, n) in enumerate(zip(query.split(1), key.split(1), value.split(1),
                                                      document_lengths(seg), earlier_lengths(segs, rank))):
            # the first document's earlier tokens are the last n gathered before this rank's own tail
            earlier = None if gathered is None else [t[r:r + 1, :, rank * tail - n:rank * tail] for t in gathered]
            rows.append(row_attention(original, module, q, k, v, lengths, earlier, **kwargs))
        return torch.cat(rows, dim=0), None

    context_parallel_sdpa.context_parallel = True
    context_parallel_sdpa._h1tune_original = original  # a nested block unwraps to transformers' function
    return context_parallel_sdpa
