"""Splitting the training rows (packed rows or examples) across ranks: every row once per epoch, in
the order one process would have used.

accelerate gives each rank whole batches in turn (rank r takes batches r, r + W, ...) and, when the
last round is short, fills it by repeating rows from the start of the epoch (`even_batches`), so
those rows would be trained twice. h1tune pads the epoch instead, with blank rows (one token, no
label): they add no loss and no labelled token, so the gradient is that of the real rows alone.
The real rows keep the order of the single-process sampler (same seed, same permutation) and the
blank ones come last, so N ranks at batch b see exactly the batches that one process sees with
gradient accumulation N at batch b (tests/integration/test_distributed.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Iterator

from torch.utils.data import Sampler

from h1tune.data.render import IGNORE_INDEX


def blank_count(rows: int, per_device_batch: int, world_size: int) -> int:
    """Blank rows that make `rows` fill whole rounds of `world_size` batches of `per_device_batch`."""
    round_size = per_device_batch * world_size
    return -rows % round_size


def blank_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row shaped like `row` (same keys, so the same collator) with one token and no label."""
    blank = {key: value[:1] if hasattr(value, "__getitem__") and not isinstance(value, str) else value
             for key, value in row.items()}
    blank["labels"] = [IGNORE_INDEX]
    return blank


class PaddedRows(Sequence):
    """The real rows, then `blanks` blank rows."""

    def __init__(self, rows: Sequence, blanks: int):
        self.rows = rows
        self.blanks = blanks
        self.blank = blank_row(rows[0]) if blanks else None

    def __len__(self) -> int:
        return len(self.rows) + self.blanks

    def __getitem__(self, index: int):
        if index < 0:
            index += len(self)
        if index < len(self.rows):
            return self.rows[index]
        if index < len(self):
            return self.blank
        raise IndexError(index)


class RealRowsFirst(Sampler):
    """The single-process shuffle of the real rows, then the blank rows' indices.

    `inner` is the sampler one process would use (accelerate's SeedableRandomSampler over the real
    rows, seeded with training.seed); it is not a RandomSampler itself, so accelerate shards it as
    it is instead of replacing it with a shuffle over real and blank rows together.
    """

    def __init__(self, inner: Sampler, real: int, total: int):
        self.inner = inner
        self.real = real
        self.total = total

    def __iter__(self) -> Iterator[int]:
        yield from self.inner
        yield from range(self.real, self.total)

    def __len__(self) -> int:
        return self.total

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)


def padded_sampler(rows: Sequence, per_device_batch: int, world_size: int, seed: int) -> tuple[PaddedRows, RealRowsFirst]:
    """The dataset and sampler for `world_size` ranks: real rows shuffled as with one process, blanks last."""
    from accelerate.data_loader import SeedableRandomSampler

    padded = PaddedRows(rows, blank_count(len(rows), per_device_batch, world_size))
    inner = SeedableRandomSampler(data_source=rows, data_seed=seed)
    return padded, RealRowsFirst(inner, len(rows), len(padded))
