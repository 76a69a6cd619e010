"""Context-parallel attention: local queries against the whole row's keys and values.

Each rank holds the queries of its slice; keys and values of every slice are all-gathered (one
collective for both), and the mask lets query i see key j when both are in the same document and
j's position in the row is not after i's. The scores then run through transformers' own SDPA
function with that boolean mask, so grouped-query heads, scaling and dropout stay transformers'.
The key/value gradients of other ranks' queries return through the all-gather's backward.

Keys are cropped to the span the slice's queries can see (from its first document's start to its
last token), so a rank scores at most L_slice x (its end position) pairs; documents that lie wholly
inside the slice still score against each other under the mask (a per-document split, as
`h1tune.ssm.attention` does, or a ring/flash kernel on GPUs, would skip those).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from h1tune.context_parallel.collectives import all_gather, rank_and_size
from h1tune.context_parallel.segments import gather_segments, local_segments


def visible_keys(segs: torch.Tensor, rank: int) -> tuple[int, int]:
    """The row positions [lo, hi) that rank `rank`'s queries can see: from the start of its first
    document (in any row) to its own last token. Cropping the keys to them spares the scores of
    keys that the mask would drop anyway: all later ranks' keys, and earlier documents'."""
    world, rows, length = segs.shape
    keys = segs.permute(1, 0, 2).reshape(rows, world * length)
    lo = int((keys < segs[rank][:, :1]).sum(-1).min())  # segment ids never decrease along a row
    return lo, (rank + 1) * length


def row_mask(segs: torch.Tensor, rank: int, lo: int, hi: int) -> torch.Tensor:
    """(b, 1, L_slice, hi - lo) boolean mask of rank `rank`'s queries over the row's keys [lo, hi).

    `segs` (world, b, L_slice) are every rank's segment ids; a key is visible when it is in the
    query's document and not after it in the row.
    """
    world, rows, length = segs.shape
    keys = segs.permute(1, 0, 2).reshape(rows, world * length)[:, lo:hi]
    queries = segs[rank]
    query_pos = torch.arange(length, device=segs.device) + rank * length
    key_pos = torch.arange(lo, hi, device=segs.device)
    causal = key_pos[None, :] <= query_pos[:, None]  # (L_slice, hi - lo)
    same = queries[:, :, None] == keys[:, None, :]  # (b, L_slice, hi - lo)
    return (same & causal).unsqueeze(1)


def gather_keys_values(key: torch.Tensor, value: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """The row's keys and values (b, h_kv, L, d) from every rank's (b, h_kv, L_slice, d)."""
    split = key.shape[-1]
    stack = all_gather(torch.cat([key, value], dim=-1), group)  # (world, b, h_kv, L_slice, dk + dv)
    world, rows, heads, length, width = stack.shape
    row = stack.permute(1, 2, 0, 3, 4).reshape(rows, heads, world * length, width)
    return row[..., :split], row[..., split:]


def make_attention(original: Callable, group) -> Callable:
    """An "sdpa" attention function for `AttentionInterface` that attends over the whole row."""

    def context_parallel_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        rank, _ = rank_and_size(group)
        seg = local_segments(kwargs.pop("seq_idx", None), query, query.shape[2])
        segs = gather_segments(seg, group)
        lo, hi = visible_keys(segs, rank)
        row_key, row_value = gather_keys_values(key, value, group)
        kwargs.pop("is_causal", None)  # the mask is the causality
        return original(module, query, row_key[:, :, lo:hi], row_value[:, :, lo:hi], row_mask(segs, rank, lo, hi),
                        dropout=dropout, scaling=scaling, **kwargs)

    context_parallel_sdpa.context_parallel = True
    context_parallel_sdpa._h1tune_original = original  # a nested block unwraps to transformers' function
    return context_parallel_sdpa
