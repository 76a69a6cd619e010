"""Context parallelism in the training loop (issue 25): which batches each rank gets, and which configs and
launches are refused. The two-process runs are in tests/integration/test_context_parallel.py."""

from __future__ import annotations

import pytest

from h1tune.config import ConfigError, load_config
from h1tune.train.context_groups import GroupBatches
from h1tune.train.launch import Topology, check_launchable


class Fixed:
    def __init__(self, order):
        self.order = order

    def __iter__(self):
        return iter(self.order)

    def __len__(self):
        return len(self.order)


def dealt(sampler, batch: int, world: int) -> dict[int, list[list[int]]]:
    """What accelerate gives each rank: the sampler's batches round-robin."""
    indices = list(sampler)
    batches = [indices[i:i + batch] for i in range(0, len(indices), batch)]
    return {rank: batches[rank::world] for rank in range(world)}


def test_ranks_of_a_group_get_the_same_batches_and_groups_split_the_data():
    """4 processes, context_parallel 2: ranks 0-1 and 2-3 each see one data-parallel share, which
    together are the rows in the data-parallel sampler's order, each once."""
    order = [5, 2, 7, 0, 3, 6, 1, 4]
    ranks = dealt(GroupBatches(Fixed(order), batch=2, data_parallel=2, size=2), batch=2, world=4)
    assert ranks[0] == ranks[1] == [[5, 2], [3, 6]] and ranks[2] == ranks[3] == [[7, 0], [1, 4]]
    one_group = dealt(GroupBatches(Fixed(order), batch=2, data_parallel=1, size=2), batch=2, world=2)
    assert one_group[0] == one_group[1] == [order[i:i + 2] for i in range(0, 8, 2)]


def cp_config(tmp_path, *overrides):
    (tmp_path / "c.yaml").write_text("data: {train: t.jsonl, packing: true}\ntraining: {context_parallel: 2, distributed: ddp}\n")
    return load_config(tmp_path / "c.yaml", list(overrides))


def test_data_parallel_times_context_parallel_launches_are_checked(tmp_path):
    cfg = cp_config(tmp_path)
    check_launchable(cfg, Topology(4, 1, 0, None, None), environ={})  # 2 groups of 2: fine
    with pytest.raises(ConfigError, match=r"--nproc: 3 process\(es\) in all cannot form groups of "
                                          r"training.context_parallel \(2\)"):
        check_launchable(cfg, Topology(3, 1, 0, None, None), environ={})


def test_context_parallel_needs_packed_sft_rows_under_ddp(tmp_path):
    with pytest.raises(ConfigError) as refused:
        cp_config(tmp_path, "data.packing=false", "training.distributed=fsdp")
    assert "needs data.packing: true" in str(refused.value) and "not 'fsdp'" in str(refused.value)
    with pytest.raises(ConfigError, match="objective dpo is not supported yet"):
        cp_config(tmp_path, "training.objective=dpo")


def test_one_process_cannot_split_its_rows():
    from h1tune.errors import H1tuneError
    from h1tune.train.context_groups import make_context_group

    with pytest.raises(H1tuneError, match=r"training.context_parallel: 2 ranks per row, but this run has 1 "
                                          r"process\(es\); .* --nproc 2"):
        make_context_group(2)


def test_train_without_nproc_is_refused_before_anything_loads(tmp_path, monkeypatch, capsys):
    from h1tune.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    (tmp_path / "t.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "c.yaml").write_text(f"data: {{train: {tmp_path / 't.jsonl'}, packing: true}}\n"
                                     f"training: {{context_parallel: 2, distributed: ddp}}\noutput_dir: {tmp_path / 'run'}\n")
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    assert "h1tune train CONFIG --nproc 2" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_a_blank_row_still_splits_into_slices_the_conv_can_read():
    """sharding.py pads an epoch with one-token blank rows; split over 2 ranks each slice still holds a conv
    halo's worth of tokens (a 4-process run stopped on this), and no label is added."""
    import torch

    from h1tune import context_parallel as cp
    from h1tune.train.context_groups import MIN_SLICE

    blank = {"input_ids": torch.tensor([[7]]), "labels": torch.tensor([[-100]]), "position_ids": torch.tensor([[0]]),
             "seq_idx": torch.tensor([[0]], dtype=torch.int32)}
    slices = cp.split_packed_batch(cp.pad_to_multiple(blank, 2 * MIN_SLICE), 2)
    assert [s["input_ids"].shape[1] for s in slices] == [MIN_SLICE, MIN_SLICE]
    assert all((s["shift_labels"] == -100).all() for s in slices) and int(slices[0]["num_items_in_batch"]) == 0
