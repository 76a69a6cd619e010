"""Splitting a packed batch for context parallelism: equal contiguous slices, global segment ids,
labels shifted on the whole row (no slice loses its last target), a padding document, one count."""

import pytest
import torch

from h1tune import context_parallel as cp
from h1tune.data.packing import collate_packed
from h1tune.errors import H1tuneError


def _batch(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return collate_packed([{"input_ids": torch.randint(5, 1000, (n,), generator=gen).tolist()} for n in lengths])


def test_shift_labels_moves_each_label_one_step_left():
    labels = torch.tensor([[-100, 7, 8, -100, 9]])
    assert cp.shift_labels(labels).tolist() == [[7, 8, -100, 9, -100]]


def test_slices_are_equal_contiguous_and_rejoin_to_the_padded_row():
    batch = _batch([5, 9, 3])  # 17 tokens -> padded to 20 for 4 slices
    slices = cp.split_packed_batch(batch, 4, pad_token_id=0)
    assert [s["input_ids"].shape for s in slices] == [torch.Size([1, 5])] * 4
    ids = torch.cat([s["input_ids"] for s in slices], dim=1)
    assert ids[:, :17].equal(batch["input_ids"]) and ids[0, 17:].tolist() == [0, 0, 0]
    positions = torch.cat([s["position_ids"] for s in slices], dim=1)
    assert positions[:, :17].equal(batch["position_ids"]) and positions[0, 17:].tolist() == [0, 1, 2]


def test_labels_are_shifted_before_the_cut_so_no_target_is_lost():
    batch = _batch([6, 6])  # the cut at 6 is a document boundary; the cut at 3 is inside document 0
    slices = cp.split_packed_batch(batch, 4)
    shifted = torch.cat([s["shift_labels"] for s in slices], dim=1)
    assert shifted.equal(cp.shift_labels(batch["labels"]))
    assert slices[0]["shift_labels"][0, -1] == batch["labels"][0, 3]  # the slice's last target lives on rank 1
    assert slices[1]["shift_labels"][0, -1] == -100  # the last token of document 0 predicts nothing
    counts = {int(s["num_items_in_batch"]) for s in slices}
    assert counts == {10}  # 2 documents x 5 targets, counted on the whole row, the same on every rank


def test_segment_ids_are_global_monotonic_and_the_padding_is_a_document_of_its_own():
    batch = _batch([4, 3, 2])
    batch["seq_idx"] = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 1, 1]], dtype=torch.int32)  # a collator reusing ids
    slices = cp.split_packed_batch(batch, 2)  # 9 -> 10 tokens
    seg = torch.cat([s["seq_idx"] for s in slices], dim=1)
    assert seg.tolist() == [[0, 0, 0, 0, 1, 1, 1, 2, 2, 3]]
    assert seg.dtype == torch.int32
    assert torch.cat([s["shift_labels"] for s in slices], dim=1)[0, -2:].tolist() == [-100, -100]


def test_a_row_that_already_divides_is_not_padded():
    batch = _batch([4, 4])
    slices = cp.split_packed_batch(batch, 2)
    assert torch.cat([s["input_ids"] for s in slices], dim=1).equal(batch["input_ids"])


def test_several_rows_are_cut_at_the_same_positions():
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7], "position_ids": [0, 1, 2], "seq_idx": [0, 0, 0]},
            {"input_ids": [8, 9, 10], "labels": [8, 9, 10], "position_ids": [0, 1, 0], "seq_idx": [0, 0, 1]}]
    slices = cp.split_packed_batch(collate_packed(rows), 2)
    assert [s["input_ids"].shape for s in slices] == [torch.Size([2, 2])] * 2
    assert torch.cat([s["seq_idx"] for s in slices], dim=1).tolist() == [[0, 0, 0, 1], [0, 0, 1, 2]]


def test_a_batch_missing_a_field_is_refused_with_every_problem():
    batch = _batch([4])
    del batch["seq_idx"], batch["position_ids"]
    with pytest.raises(H1tuneError, match="no 'position_ids'.*no 'seq_idx'"):
        cp.split_packed_batch(batch, 2)
    with pytest.raises(H1tuneError, match="num_slices must be at least 1"):
        cp.split_packed_batch(_batch([4]), 0)


def test_token_loss_over_the_slices_adds_up_to_the_row_mean():
    batch = _batch([7, 5])
    logits = torch.randn(1, 12, 50, generator=torch.Generator().manual_seed(1))
    labels = batch["labels"] % 50
    labels[batch["labels"] == -100] = -100
    want = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
    slices = cp.split_packed_batch({**batch, "labels": labels}, 3)
    parts = logits.chunk(3, dim=1)
    got = sum(cp.token_loss(p, s["shift_labels"], s["num_items_in_batch"]) for p, s in zip(parts, slices))
    torch.testing.assert_close(got, want)
