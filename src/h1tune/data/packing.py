"""Exact sequence packing: tokenised examples -> padding-free rows that keep documents apart.

A packed row concatenates whole documents. Three signals keep them apart in Falcon-H1:
`position_ids` restart at 0 per document (transformers then builds a block-diagonal causal mask,
but only when no `attention_mask` is passed and no cache exists), `seq_idx` numbers the documents
(h1tune's kernels, `h1tune.ssm.install()`, reset the conv and SSM state where it changes), and the
label at each document's first token is -100 (the model's causal-LM loss shifts labels by one, so
otherwise the previous document's last token would be trained to predict it).

    plan = plan_packing([len(e["input_ids"]) for e in examples], max_length=2048)
    batch = collate_packed([examples[i] for i in plan.rows[0]])
    model(**batch, use_cache=False)   # no attention_mask

Rows are filled by best-fit decreasing; `plan.fill_ratio` says how much of each row is real tokens.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from h1tune.data.render import IGNORE_INDEX
from h1tune.errors import DataError


@dataclass(frozen=True)
class PackingPlan:
    """Which examples share a row. `rows[i]` lists example indices in the order they are packed."""

    rows: list[list[int]]
    lengths: list[int]
    max_length: int

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def fill_ratio(self) -> float:
        """Real tokens / row capacity (1.0 means no padding would be needed for fixed-size rows)."""
        return self.num_tokens / (len(self.rows) * self.max_length) if self.rows else 1.0


def plan_packing(lengths: Sequence[int], max_length: int) -> PackingPlan:
    """Best-fit decreasing: longest example first, into the fullest row that still has room.

    Raises:
        DataError: an example is empty or longer than `max_length` (no document is ever split,
            since a split document would lose its context without anyone noticing).
    """
    if max_length < 1:
        raise DataError(f"packing max_length must be at least 1, got {max_length}")
    lengths = [int(n) for n in lengths]
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        first = too_long[0]
        raise DataError(
            f"{len(too_long)} example(s) are longer than max_length={max_length} (first: example {first} "
            f"with {lengths[first]} tokens); truncate them when tokenising or raise max_length"
        )
    empty = [i for i, n in enumerate(lengths) if n == 0]
    if empty:
        raise DataError(f"example {empty[0]} has no tokens ({len(empty)} empty in total); drop empty examples")

    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted, for best-fit lookup
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        spot = bisect.bisect_left(free, (lengths[i], -1))
        if spot == len(free):
            rows.append([i])
            room, row = max_length - lengths[i], len(rows) - 1
        else:
            room, row = free.pop(spot)
            rows[row].append(i)
            room -= lengths[i]
        if room > 0:
            bisect.insort(free, (room, row))
    return PackingPlan(rows=rows, lengths=lengths, max_length=max_length)


def _tokens(example: Mapping, index: int) -> tuple[list[int], list[int]]:
    if "input_ids" not in example:
        raise DataError(f"example {index} has no 'input_ids' (keys: {sorted(example)}); tokenise before packing")
    ids = [int(t) for t in example["input_ids"]]
    labels = [int(t) for t in example.get("labels", ids)]
    if len(labels) != len(ids):
        raise DataError(f"example {index}: {len(labels)} labels for {len(ids)} input_ids; they must align")
    if not ids:
        raise DataError(f"example {index} has no tokens; drop empty examples before packing")
    return ids, labels


def pack_row(examples: Sequence[Mapping], length: int | None = None, pad_token_id: int = 0) -> dict[str, list[int]]:
    """One packed row as lists: input_ids, labels, position_ids, seq_idx.

    With `length`, the tail is filled with a padding document (its own positions, seq_idx and
    -100 labels), so it is isolated like any other document and no attention_mask is needed.
    """
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": [], "seq_idx": []}
    for doc, example in enumerate(examples):
        ids, labels = _tokens(example, doc)
        row["input_ids"] += ids
        row["labels"] += [IGNORE_INDEX] + labels[1:]  # never predict a document from the previous one
        row["position_ids"] += list(range(len(ids)))
        row["seq_idx"] += [doc] * len(ids)
    used = len(row["input_ids"])
    if length is not None:
        if used > length:
            raise DataError(f"{used} tokens do not fit in a row of {length}; plan rows with plan_packing")
        pad = length - used
        row["input_ids"] += [pad_token_id] * pad
        row["labels"] += [IGNORE_INDEX] * pad
        row["position_ids"] += list(range(pad))
        row["seq_idx"] += [len(examples)] * pad
    return row


def pack_examples(examples: Sequence[Mapping], max_length: int) -> tuple[list[dict[str, list[int]]], PackingPlan]:
    """Pack a dataset: one unpadded row per plan row, plus the plan (for its fill ratio)."""
    checked = [_tokens(e, i) for i, e in enumerate(examples)]
    plan = plan_packing([len(ids) for ids, _ in checked], max_length)
    rows = [pack_row([examples[i] for i in row]) for row in plan.rows]
    return rows, plan


def collate_packed(
    examples: Sequence[Mapping], pad_token_id: int = 0, cu_seq_lens: bool = False
):
    """Tensors for `model(**batch, use_cache=False)`.

    `examples` is either plain tokenised examples, which become one padding-free row (1, L) as in
    TRL's padding-free collator, or rows from `pack_examples` (they have `seq_idx`), which are
    stacked into (B, L) with a padding document at each short row's end.
    No attention_mask: transformers only builds the block-diagonal mask from position_ids without
    one. `cu_seq_lens=True` adds cu_seq_lens_q/k and max_length_q/k over the flattened batch for
    flash-attention varlen; the torch path does not need them.
    """
    import torch

    if not examples:
        raise DataError("cannot collate an empty batch")
    if all("seq_idx" in e for e in examples):
        length = max(len(e["input_ids"]) for e in examples)
        rows = [_pad_row(e, length, pad_token_id) for e in examples]
    else:
        rows = [pack_row(examples)]
    batch = {
        "input_ids": torch.tensor([r["input_ids"] for r in rows], dtype=torch.long),
        "labels": torch.tensor([r["labels"] for r in rows], dtype=torch.long),
        "position_ids": torch.tensor([r["position_ids"] for r in rows], dtype=torch.long),
        "seq_idx": torch.tensor([r["seq_idx"] for r in rows], dtype=torch.int32),
    }
    if cu_seq_lens:
        starts = (batch["position_ids"].flatten() == 0).nonzero().flatten()
        total = torch.tensor([batch["position_ids"].numel()])
        cu = torch.cat([starts, total]).to(torch.int32)
        longest = int((cu[1:] - cu[:-1]).max())
        batch |= {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    return batch


def _pad_row(row: Mapping, length: int, pad_token_id: int) -> dict[str, list[int]]:
    pad = length - len(row["input_ids"])
    if not pad:
        return dict(row)
    next_doc = (max(row["seq_idx"]) + 1) if row["seq_idx"] else 0
    return {
        "input_ids": list(row["input_ids"]) + [pad_token_id] * pad,
        "labels": list(row["labels"]) + [IGNORE_INDEX] * pad,
        "position_ids": list(row["position_ids"]) + list(range(pad)),
        "seq_idx": list(row["seq_idx"]) + [next_doc] * pad,
    }
