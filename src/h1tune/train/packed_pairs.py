"""Exact packed DPO: chosen and rejected sequences of several pairs share packed rows.

TRL 1.16's `DPOTrainer` has padding-free batches switched off ("temporarily unavailable after a
refactor"), and its loss code reads per-token outputs in the padded layout `[2B, L]` (chosen rows,
then rejected rows). h1tune keeps TRL's loss code untouched and changes only where the forward
runs: the collator (`PackedPairCollator`) adds a packing layout to TRL's padded batch, and while
the loss is computed (`packed_forward`) a pre-hook on the policy and the reference model replaces
each padded call by one on packed rows (position ids restart per sequence, `seq_idx` numbers them,
no attention mask: block-diagonal attention and boundary-aware Mamba kernels, `h1tune.ssm`), and a
forward hook scatters the per-token outputs back into the padded layout. Every sequence's
log-probabilities are therefore summed over its own tokens only, exactly as in the padded batch,
and every TRL loss type, metric and reference path works unchanged (`tests/integration/
test_dpo_packed.py` checks loss and gradients against padded batches).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from h1tune.data.packing import plan_packing
from h1tune.data.render import IGNORE_INDEX
from h1tune.errors import H1tuneError

PACK_KEYS = ("pack_index", "pack_position_ids", "pack_seq_idx")
_PER_TOKEN = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


def pack_layout(lengths: list[int], max_length: int) -> dict[str, torch.Tensor]:
    """Where each sequence goes in packed rows of at most `max_length` tokens (best-fit decreasing).

    `pack_index[i, j]` is the flat position (row * row_length + column) of token j of sequence i,
    -1 past its end; each row's tail is a padding sequence of its own.
    """
    plan = plan_packing(lengths, max_length)
    row_length = max(sum(lengths[i] for i in row) for row in plan.rows)
    rows = len(plan.rows)
    index = torch.full((len(lengths), max(lengths)), -1, dtype=torch.long)
    position_ids = torch.zeros((rows, row_length), dtype=torch.long)
    seq_idx = torch.zeros((rows, row_length), dtype=torch.int32)
    for r, row in enumerate(plan.rows):
        offset = 0
        for doc, i in enumerate(row):
            n = lengths[i]
            position_ids[r, offset:offset + n] = torch.arange(n)
            seq_idx[r, offset:offset + n] = doc
            index[i, :n] = r * row_length + offset + torch.arange(n)
            offset += n
        position_ids[r, offset:] = torch.arange(row_length - offset)
        seq_idx[r, offset:] = len(row)
    return {"pack_index": index, "pack_position_ids": position_ids, "pack_seq_idx": seq_idx}


@dataclass
class PackedPairCollator:
    """TRL's padded preference batch plus the packing layout of its 2B sequences."""

    pad_token_id: int
    max_length: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        batch = DataCollatorForPreference(pad_token_id=self.pad_token_id)(examples)
        lengths = [len(e["prompt_ids"]) + len(e[side]) for side in ("chosen_ids", "rejected_ids") for e in examples]
        return {**batch, **pack_layout(lengths, self.max_length)}


class PackedView:
    """One batch's mapping between the padded layout `[N, L]` and the packed rows `[R, Lp]`."""

    def __init__(self, batch: dict[str, torch.Tensor], pad_token_id: int):
        index = batch["pack_index"]
        self.position_ids, self.seq_idx = batch["pack_position_ids"], batch["pack_seq_idx"]
        rows, self.row_length = self.position_ids.shape
        self.size = rows * self.row_length
        self.valid = index >= 0
        self.destination = index[self.valid]
        self.doc_start = self.position_ids == 0  # never predict a sequence from the one before it
        # Per-token outputs are shifted (position t scores token t+1): padded (i, j) is the packed
        # position just before token j+1 of sequence i, in rows of row_length - 1.
        following = index[:, 1:]
        self.scored = following >= 0
        q = following.clamp(min=0)
        before = (q // self.row_length) * (self.row_length - 1) + q % self.row_length - 1
        self.source = torch.where(self.scored, before, 0)
        self.input_ids = self.pack(batch["input_ids"], pad_token_id)

    def pack(self, padded: torch.Tensor, fill: int) -> torch.Tensor:
        flat = padded.new_full((self.size,), fill)
        flat[self.destination] = padded[self.valid]
        return flat.view(-1, self.row_length)

    def pack_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return self.pack(labels, IGNORE_INDEX).masked_fill(self.doc_start, IGNORE_INDEX)

    def unpack(self, per_token: torch.Tensor) -> torch.Tensor:
        """`[R, Lp - 1]` per-token outputs -> `[N, L - 1]`, zero where the padded batch has padding."""
        values = per_token.reshape(-1)[self.source.reshape(-1)].view(self.source.shape)
        return values.masked_fill(~self.scored, 0)

    def unpack_output(self, output: Any) -> Any:
        from trl.trainer.utils import FusedCausalLMOutput

        if not isinstance(output, FusedCausalLMOutput):
            raise H1tuneError(f"packed preference batches need TRL's fused LM head output, got "
                              f"{type(output).__name__}; set data.packing: false")
        fields = {name: None if getattr(output, name) is None else self.unpack(getattr(output, name))
                  for name in _PER_TOKEN}
        return FusedCausalLMOutput(loss=output.loss, aux_loss=output.aux_loss, **fields)


@contextmanager
def packed_forward(modules: Iterable[torch.nn.Module], batch: dict[str, torch.Tensor], pad_token_id: int):
    """While active, a call of any of `modules` on `batch["input_ids"]` runs on the packed rows."""
    view = PackedView(batch, pad_token_id)
    padded_ids = batch["input_ids"]

    def to_packed(module, args, kwargs):
        if args or kwargs.get("input_ids") is not padded_ids:
            return None  # another call (e.g. generation): untouched
        kwargs = {**kwargs, "input_ids": view.input_ids, "position_ids": view.position_ids, "seq_idx": view.seq_idx}
        kwargs.pop("attention_mask", None)  # transformers builds the block-diagonal mask only without one
        if kwargs.get("labels") is not None:
            kwargs["labels"] = view.pack_labels(kwargs["labels"])
        return args, kwargs

    def to_padded(module, args, kwargs, output):
        return view.unpack_output(output) if kwargs.get("input_ids") is view.input_ids else None

    handles = []
    try:
        for module in modules:
            handles.append(module.register_forward_pre_hook(to_packed, with_kwargs=True))
            handles.append(module.register_forward_hook(to_padded, with_kwargs=True))
        yield view
    finally:
        for handle in handles:
            handle.remove()
