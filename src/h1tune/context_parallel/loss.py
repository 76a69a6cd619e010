"""The per-rank loss of a context-parallel step: summed token cross-entropy over the row's count.

Each rank scores only its slice, with labels already shifted by `split_packed_batch` (the model's
own shift would drop the slice's last target, whose label lives on the next rank). Dividing each
rank's sum by the whole row's labelled-token count makes the ranks' losses add up to the row's
mean loss, which is what one process computes; see the package docstring for how gradients must
then be reduced.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from h1tune.data.render import IGNORE_INDEX


def token_loss(logits: torch.Tensor, shift_labels: torch.Tensor,
               num_items_in_batch: torch.Tensor | int) -> torch.Tensor:
    """sum_t CE(logits_t, shift_labels_t) / num_items_in_batch, in fp32 like transformers' loss.

    Args:
        logits: (rows, slice_length, vocab) of this rank's slice.
        shift_labels: (rows, slice_length) from `split_packed_batch` (no further shift here).
        num_items_in_batch: labelled tokens of the whole row(s), the same on every rank.
    """
    total = F.cross_entropy(logits.float().flatten(0, -2), shift_labels.flatten().to(logits.device),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
