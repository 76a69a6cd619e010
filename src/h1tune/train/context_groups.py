"""The training loop's side of context parallelism (`training.context_parallel: N`, issue 25).

`h1tune.context_parallel` makes one forward/backward over a row split across N ranks exact; this module
puts it in the Trainer:

- groups: ranks [0..N-1], [N..2N-1], ... each share rows (a process group of their own, so their
  collectives never interleave with DDP's gradient buckets); `--nproc` = data-parallel x N;
- batches: every rank of a group gets the same batch (accelerate deals batches round-robin to ranks, so
  the sampler repeats each data-parallel batch N times in a round; rows as sharding.py orders them);
- the step: this rank's slice of the batch, through the model with the group's exchanges on, the loss
  of its tokens over the whole row's labelled tokens. DDP averages gradients over all ranks, where a
  group's must be summed: the loss is scaled by N, so the average is the mean over data-parallel groups
  of each group's row gradient (the same as one process with gradient accumulation over those groups).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler

from h1tune.errors import H1tuneError
from h1tune.train import sharding


# Every slice holds at least this many tokens (a padding document fills up): the conv reads d_conv - 1 = 3
# tokens of the previous slice, and sharding's blank rows (one token) must split too.
MIN_SLICE = 8


@dataclass(frozen=True)
class ContextGroup:
    size: int  # ranks per row
    rank: int  # this rank's slice
    group: Any  # torch.distributed ProcessGroup of the ranks sharing rows
    data_parallel: int  # groups


def make_context_group(size: int) -> ContextGroup:
    """Every rank creates every group (torch requires it), then keeps its own."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() % size:
        world = dist.get_world_size() if dist.is_initialized() else 1
        raise H1tuneError(f"training.context_parallel: {size} ranks per row, but this run has {world} process(es); "
                          f"launch a multiple of {size}: h1tune train CONFIG --nproc {size}")
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = [dist.new_group(list(range(start, start + size))) for start in range(0, world, size)]
    return ContextGroup(size, rank % size, groups[rank // size], world // size)


class GroupBatches(Sampler):
    """The data-parallel sampler's batches, each repeated for the `size` ranks of its group, in the order
    accelerate deals them: a round of `data_parallel * size` batches gives rank r data-parallel batch r // size."""

    def __init__(self, inner: Sampler, batch: int, data_parallel: int, size: int):
        self.inner, self.batch, self.data_parallel, self.size = inner, batch, data_parallel, size

    def __iter__(self) -> Iterator[int]:
        indices = list(self.inner)
        round_rows = self.batch * self.data_parallel
        for start in range(0, len(indices), round_rows):
            rows = indices[start:start + round_rows]
            for rank in range(self.data_parallel * self.size):
                yield from rows[(rank // self.size) * self.batch:(rank // self.size + 1) * self.batch]

    def __len__(self) -> int:
        return len(self.inner) * self.size

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)


def group_sampler(rows: Sequence, batch: int, context: ContextGroup, seed: int):
    """The dataset and sampler for a context-parallel run (sharding.padded_sampler at the data-parallel size)."""
    padded, inner = sharding.padded_sampler(rows, batch, context.data_parallel, seed)
    return padded, GroupBatches(inner, batch, context.data_parallel, context.size)


def context_parallel_loss_sum(model, causal_lm, inputs: dict, context: ContextGroup,
                              pad_token_id: int) -> tuple[torch.Tensor, int]:
    """This rank's slice of the batch through the model: the summed loss of its tokens, and the labelled tokens
    of the whole batch (what one process would divide by). Call inside `h1tune.context_parallel.enabled`,
    the backward too."""
    from h1tune import context_parallel as cp
    from h1tune.lm.loss import chunked_lm_loss, final_hidden_states

    whole = cp.pad_to_multiple({k: v.cpu() for k, v in inputs.items()}, context.size * MIN_SLICE, pad_token_id)
    mine = cp.split_packed_batch(whole, context.size, pad_token_id)[context.rank]
    device = inputs["input_ids"].device
    hidden = final_hidden_states(model, causal_lm, input_ids=mine["input_ids"].to(device),
                                 position_ids=mine["position_ids"].to(device), seq_idx=mine["seq_idx"].to(device))
    total, _ = chunked_lm_loss(hidden, mine["shift_labels"].to(device), causal_lm.lm_head,
                               causal_lm.model.lm_head_multiplier, shifted=True)
    return total, int(mine["num_items_in_batch"])
