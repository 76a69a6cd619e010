"""Padding collator: a batch of `{"input_ids", "labels"}` examples as right-padded tensors.

Padded positions get the pad id, label -100 and attention_mask 0, so they cost compute but never
loss. Packing (no padding at all) lives in `packing.py`.
"""

from __future__ import annotations

from typing import Any, Sequence

from h1tune.data.render import IGNORE_INDEX


def pad_collate(examples: Sequence[dict[str, Any]], pad_token_id: int,
                pad_to_multiple_of: int | None = None) -> dict[str, Any]:
    """Right-pad to the longest example (rounded up to `pad_to_multiple_of`); returns torch tensors."""
    import torch

    longest = max(len(e["input_ids"]) for e in examples)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.as_tensor(example["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(example["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
