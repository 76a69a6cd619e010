"""The one causal-LM loss h1tune computes itself: shifted cross-entropy over labelled tokens.

Training loss comes from the model (transformers' loss); this is what h1tune adds on top of it:
a token-weighted eval loss (summed, divided once, so independent of batch size and padding) and
the adapter probe's float64 loss. Both call `shifted_cross_entropy`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from h1tune.data.render import IGNORE_INDEX


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *,
                          reduction: Literal["sum", "mean"] = "sum",
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Cross-entropy of position t's logits against label t+1, ignoring IGNORE_INDEX labels.

    `dtype` is the precision of the softmax: fp32 for evaluation, float64 for the probe (μP's small
    lm_head multiplier makes fp32 loss changes sub-ulp there).
    """
    shift_logits = logits[:, :-1].to(dtype).reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].to(logits.device).reshape(-1)
    return torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX,
                                             reduction=reduction)


def labelled_tokens(labels: torch.Tensor) -> int:
    """How many positions carry loss after the shift."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def token_loss_sum(model: Any, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled tokens of `batch`, and their count."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    return shifted_cross_entropy(logits, labels, reduction="sum"), labelled_tokens(labels)
