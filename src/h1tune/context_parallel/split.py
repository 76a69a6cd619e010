"""Split one packed batch into equal contiguous slices, one per rank of a context-parallel group.

    slices = split_packed_batch(batch, num_slices=cp_size)   # batch from collate_packed
    mine = slices[cp_rank]   # input_ids, position_ids, seq_idx, shift_labels, num_items_in_batch

Three things are settled on the whole row, before it is cut, because no slice can settle them:
- `seq_idx` becomes the row's monotonic segment ids (`kernels.segment_ids`), so a document id
  means the same document on every rank: ranks compare ids to decide whether a carried SSM state,
  a conv halo or a key belongs to a query's document.
- labels are shifted here (`shift_labels[t]` = label of token t+1, the last -100): the model's own
  shift would drop each slice's last target, whose label lives on the next rank.
- the loss normaliser (`num_items_in_batch`, labelled tokens of the whole row) is counted once,
  so the per-rank losses add up to the row's mean loss.
The row's end is padded with a padding document (its own segment id, positions from 0, labels
-100) until the length divides by `num_slices`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from h1tune.data.render import IGNORE_INDEX
from h1tune.errors import H1tuneError
from h1tune.ssm.kernels import segment_ids

REQUIRED = ("input_ids", "labels", "position_ids", "seq_idx")


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels for an unshifted loss: position t gets token t+1's label, the last position -100."""
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def pad_to_multiple(batch: Mapping[str, torch.Tensor], multiple: int, pad_token_id: int = 0) -> dict:
    """`batch` with a padding document appended to every row until its length divides by `multiple`.

    The padding document is a document of its own (a new segment id, positions from 0) with no
    labels, so it changes neither the real documents' outputs nor the loss.
    """
    length = batch["input_ids"].shape[-1]
    pad = (-length) % multiple
    if not pad:
        return dict(batch)
    rows = batch["input_ids"].shape[0]
    seg = batch["seq_idx"]
    fills = {
        "input_ids": torch.full((rows, pad), pad_token_id, dtype=batch["input_ids"].dtype),
        "position_ids": torch.arange(pad, dtype=batch["position_ids"].dtype).expand(rows, pad),
        "seq_idx": (seg[:, -1:] + 1).expand(rows, pad).to(seg.dtype),
    }
    for key in ("labels", "shift_labels"):
        if key in batch:
            fills[key] = torch.full((rows, pad), IGNORE_INDEX, dtype=batch[key].dtype)
    out = dict(batch)
    for key, fill in fills.items():
        out[key] = torch.cat([batch[key], fill.to(batch[key].device)], dim=-1)
    return out


def _check(batch: Mapping[str, torch.Tensor], num_slices: int) -> None:
    problems = [f"batch has no {key!r}" for key in REQUIRED if key not in batch]
    if num_slices < 1:
        problems.append(f"num_slices must be at least 1, got {num_slices}")
    if not problems:
        shapes = {key: tuple(batch[key].shape) for key in REQUIRED}
        if len(set(shapes.values())) != 1 or len(shapes["input_ids"]) != 2:
            problems.append(f"input_ids, labels, position_ids and seq_idx must share one (rows, length) shape, "
                            f"got {shapes}")
    if problems:
        raise H1tuneError("cannot split the batch for context parallelism: " + "; ".join(problems) +
                          " (build it with h1tune.data.packing.collate_packed)")


def split_packed_batch(batch: Mapping[str, torch.Tensor], num_slices: int, pad_token_id: int = 0) -> list[dict]:
    """Cut packed rows into `num_slices` equal contiguous slices along the sequence.

    Args:
        batch: `collate_packed` output: input_ids, labels (unshifted, as the model takes them),
            position_ids and seq_idx, each (rows, length).
        num_slices: the context-parallel group's size.
        pad_token_id: input id of the padding document that makes the length divide.
    Returns:
        One dict per rank with input_ids, position_ids, seq_idx (global segment ids, int32),
        shift_labels (already shifted: pass them to `token_loss`, never to the model as labels)
        and num_items_in_batch (labelled tokens of the whole batch, the same on every slice).
    """
    _check(batch, num_slices)
    whole = {key: batch[key] for key in REQUIRED}
    whole["shift_labels"] = shift_labels(whole.pop("labels"))
    whole["seq_idx"] = segment_ids(whole["seq_idx"]).to(torch.int32)
    whole = pad_to_multiple(whole, num_slices, pad_token_id)
    count = (whole["shift_labels"] != IGNORE_INDEX).sum()
    pieces = {key: value.chunk(num_slices, dim=-1) for key, value in whole.items()}
    return [{**{key: pieces[key][r].contiguous() for key in pieces}, "num_items_in_batch": count}
            for r in range(num_slices)]
