"""How the training rows are split across ranks, through accelerate's own `prepare_data_loader` with
the flags the Trainer passes: accelerate's default repeats rows at the end of an epoch; h1tune's
padded sampler gives every real row exactly once per epoch, in the single-process order."""

import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader, RandomSampler

from h1tune.data import pad_collate
from h1tune.data.packing import collate_packed, pack_examples
from h1tune.data.render import IGNORE_INDEX
from h1tune.train.sharding import blank_count, blank_row, padded_sampler

SEED = 42


def shard(dataset, sampler, batch: int, world: int, rank: int):
    """Rank `rank`'s loader as the Trainer builds it (even_batches and the seedable sampler are the
    Trainer's defaults, asserted in test_trainer_uses_the_flags_simulated_here)."""
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, collate_fn=list)
    return prepare_data_loader(loader, num_processes=world, process_index=rank, even_batches=True,
                               use_seedable_sampler=True, data_seed=SEED, put_on_device=False)


def epoch(loaders, epoch_index: int) -> list[list]:
    for loader in loaders:
        loader.set_epoch(epoch_index)
    return [list(loader) for loader in loaders]


def single_process_order(rows: list, batch: int, epoch_index: int) -> list:
    loader = shard(rows, RandomSampler(rows), batch, world=1, rank=0)
    loader.set_epoch(epoch_index)
    return [row for b in loader for row in b]


def rows(n: int) -> list[dict]:
    return [{"input_ids": [i + 10, 7, 8], "labels": [IGNORE_INDEX, 7, 8], "doc": i} for i in range(n)]


def test_trainer_uses_the_flags_simulated_here(tmp_path):
    from transformers import Trainer, TrainingArguments

    trainer = Trainer(model=torch.nn.Linear(1, 1), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                         report_to=[], data_seed=SEED))
    assert trainer.accelerator.even_batches and trainer.accelerator.use_seedable_sampler
    assert trainer.accelerator.dataloader_config.data_seed == SEED and not trainer.accelerator.split_batches


def test_accelerate_alone_repeats_rows_when_the_epoch_is_uneven():
    """Why h1tune pads: 13 rows, 2 ranks x batch 2 -> the last round borrows 3 rows from the epoch start."""
    data = rows(13)
    seen = [r["doc"] for batches in epoch([shard(data, RandomSampler(data), 2, 2, k) for k in (0, 1)], 0)
            for b in batches for r in b]
    assert len(seen) == 16 and len(set(seen)) == 13


@pytest.mark.parametrize("n, batch, world", [(13, 2, 2), (16, 2, 2), (5, 3, 2), (7, 1, 4), (1, 4, 3), (9, 2, 3)])
def test_every_real_row_once_per_epoch_in_the_single_process_order(n, batch, world):
    data = rows(n)
    dataset, sampler = padded_sampler(data, batch, world, SEED)
    assert len(dataset) == n + blank_count(n, batch, world) and len(dataset) % (batch * world) == 0
    loaders = [shard(dataset, sampler, batch, world, k) for k in range(world)]
    for e in (0, 1):  # a second epoch reshuffles exactly as one process does
        per_rank = epoch(loaders, e)
        assert len({len(batches) for batches in per_rank}) == 1, "every rank steps the same number of times"
        # one process takes batch i as micro-batch i; N ranks take batches i*N .. i*N+N-1 in round i
        interleaved = [row for rnd in zip(*per_rank) for b in rnd for row in b]
        real = [r["doc"] for r in interleaved if "doc" in r and r["labels"] != [IGNORE_INDEX]]
        assert real == [r["doc"] for r in single_process_order(data, batch, e)]
        assert sorted(real) == list(range(n))
        assert all(r["labels"] == [IGNORE_INDEX] for r in interleaved[n:])


def test_blank_rows_collate_like_real_ones_and_carry_no_label():
    padded_rows = rows(3)
    blank = blank_row(padded_rows[0])
    assert set(blank) == set(padded_rows[0]) and blank["input_ids"] == [10]
    batch = pad_collate([padded_rows[1], blank], pad_token_id=0)
    assert (batch["labels"][1] == IGNORE_INDEX).all() and batch["attention_mask"][1].tolist() == [1, 0, 0]
    packed, _ = pack_examples(padded_rows, max_length=16)
    packed_blank = blank_row(packed[0])
    batch = collate_packed([packed[0], packed_blank], pad_token_id=0)
    assert (batch["labels"][1] == IGNORE_INDEX).all() and batch["seq_idx"].shape == batch["input_ids"].shape
