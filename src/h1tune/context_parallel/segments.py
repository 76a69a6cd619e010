"""Which document each token of the whole row belongs to, as seen from one rank's slice.

Every cross-rank decision (does the previous rank's SSM state continue into my first token? is
that halo token or that key in my token's document?) compares document ids across slices, so the
ids must be the row's global segment ids that `split_packed_batch` writes into `seq_idx`. A
collator's raw ids (which may restart or repeat) would make two documents look like one; the
check here refuses them rather than leak state between documents.
"""

from __future__ import annotations

import torch

from h1tune.context_parallel.collectives import all_gather
from h1tune.errors import H1tuneError


def local_segments(seq_idx: torch.Tensor | None, like: torch.Tensor, length: int) -> torch.Tensor:
    """This slice's segment ids (rows, length); without `seq_idx` the row is one document."""
    if seq_idx is None:
        return torch.zeros(like.shape[0], length, dtype=torch.int32, device=like.device)
    return seq_idx.reshape(seq_idx.shape[0], -1).to(like.device)


def gather_segments(seg: torch.Tensor, group) -> torch.Tensor:
    """Every rank's segment ids in rank order (world, rows, slice_length); no gradient.

    Raises:
        H1tuneError: the ids decrease along the row, so they are not the row's global segment ids.
    """
    segs = all_gather(seg, group)
    row = segs.permute(1, 0, 2).reshape(segs.shape[1], -1)
    if bool((row[:, 1:] < row[:, :-1]).any()):
        raise H1tuneError(
            "context parallelism needs seq_idx to be the row's global segment ids (non-decreasing along the "
            "whole row, the same document the same id on every rank); split the batch with "
            "h1tune.context_parallel.split_packed_batch instead of slicing a collator's seq_idx"
        )
    return segs
