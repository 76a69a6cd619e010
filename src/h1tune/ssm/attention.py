"""Falcon-H1's attention over packed rows on CPU: one document at a time.

For a packed row transformers builds a block-diagonal causal mask from `position_ids`, and SDPA
then scores every query-key pair of the row and masks most of them away: in 512-token rows of
~130-token documents that is ~4x the pairs needed. Here each document runs alone through
transformers' own SDPA function with `is_causal=True`: the same keys for every query, so the
same result, and measured 2x faster forward+backward (8 rows of 512 tokens in 4 documents, 4 heads).
It needs the batch's `seq_idx`, which reaches the attention function with the model's kwargs;
without it (padded batches, generation), or on CUDA (flash-attention varlen already skips the
masked pairs there), transformers' function runs unchanged.

The mask nobody then reads still costs: transformers builds it from `position_ids` before the
layers run, a (length x length) bool tensor made with three elementwise passes, 4.8 s and 1 GiB
for one 32K-token row, the one quadratic term left in a long-trace step. `install()` therefore also
hands FalconH1Model its masks as already made (none) when the per-document function will run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from h1tune.ssm.kernels import segment_ids

_ORIGINAL = "_h1tune_original"


def document_lengths(seq_idx: torch.Tensor) -> list[list[int]]:
    """Per row, the lengths of its documents in order (a document is a run of one seq_idx)."""
    seg = segment_ids(seq_idx)
    lengths = []
    for row in seg:
        starts = [0, *((row[1:] != row[:-1]).nonzero().flatten() + 1).tolist(), row.numel()]
        lengths.append([end - start for start, end in zip(starts, starts[1:])])
    return lengths


def _per_document(original: Callable) -> Callable:
    def packed_sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                      **kwargs):
        seq_idx = kwargs.get("seq_idx")
        if seq_idx is None or query.is_cuda or query.shape[2] != key.shape[2] or query.shape[2] < 2:
            return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        rows = []
        # split, not slices: a slice's backward writes a zero tensor of the whole input per document
        for q, k, v, lengths in zip(query.split(1), key.split(1), value.split(1), document_lengths(seq_idx)):
            parts = [original(module, qd, kd, vd, None, dropout=dropout, scaling=scaling, is_causal=True)[0]
                     for qd, kd, vd in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))]
            rows.append(torch.cat(parts, dim=1))
        return torch.cat(rows, dim=0), None

    setattr(packed_sdpa_attention_forward, _ORIGINAL, original)
    return packed_sdpa_attention_forward


NO_MASKS = {"full_attention": None, "linear_attention": None}  # FalconH1Model skips building a dict it is given


def _without_dense_mask(forward: Callable) -> Callable:
    @functools.wraps(forward)
    def forward_without_dense_mask(self, *args, **kwargs):
        seq_idx = kwargs.get("seq_idx")
        if (len(args) <= 1 and kwargs.get("attention_mask") is None and seq_idx is not None and not seq_idx.is_cuda
                and kwargs.get("cache") is None and self.config._attn_implementation == "sdpa"
                and hasattr(_sdpa_function(), _ORIGINAL)):
            kwargs["attention_mask"] = NO_MASKS  # the per-document function reads seq_idx, never the mask
        return forward(self, *args, **kwargs)

    setattr(forward_without_dense_mask, _ORIGINAL, forward)
    return forward_without_dense_mask


def _sdpa_function() -> Callable:
    from transformers.modeling_utils import AttentionInterface

    return AttentionInterface._global_mapping["sdpa"]


def install() -> None:
    """Route `sdpa` attention calls through the per-document function, and let packed CPU forwards skip
    the dense mask (idempotent; every model in the process, as the Mamba kernel seam: calls without
    `seq_idx` are untouched)."""
    from transformers.modeling_utils import AttentionInterface
    from transformers.models.falcon_h1.modeling_falcon_h1 import FalconH1Model

    current = _sdpa_function()
    if not hasattr(current, _ORIGINAL):
        AttentionInterface.register("sdpa", _per_document(current))
    if not hasattr(FalconH1Model.forward, _ORIGINAL):
        FalconH1Model.forward = _without_dense_mask(FalconH1Model.forward)


def uninstall() -> None:
    """Put transformers' SDPA function and FalconH1Model.forward back (tests compare against them)."""
    from transformers.modeling_utils import AttentionInterface
    from transformers.models.falcon_h1.modeling_falcon_h1 import FalconH1Model

    current = _sdpa_function()
    if hasattr(current, _ORIGINAL):
        AttentionInterface.register("sdpa", getattr(current, _ORIGINAL))
    if hasattr(FalconH1Model.forward, _ORIGINAL):
        FalconH1Model.forward = getattr(FalconH1Model.forward, _ORIGINAL)
