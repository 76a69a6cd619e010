"""h1tune.data.packing: best-fit-decreasing plans, packed rows that keep documents apart, clear errors."""

import pytest
import torch

from h1tune.data.packing import IGNORE_INDEX, collate_packed, pack_examples, pack_row, plan_packing
from h1tune.errors import DataError


def test_plan_places_every_example_once_and_fits_rows():
    lengths = [9, 1, 4, 7, 3, 3, 5, 2, 10, 6]
    plan = plan_packing(lengths, max_length=10)
    placed = sorted(i for row in plan.rows for i in row)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in plan.rows)
    assert len(plan.rows) == 5 and plan.fill_ratio == pytest.approx(50 / 50)  # best fit finds the perfect packing


def test_plan_best_fit_picks_the_fullest_row_with_room():
    # after 6 and 5 are placed, 4 goes with 6 (room 4), not with 5 (room 5)
    plan = plan_packing([6, 5, 4], max_length=10)
    assert plan.rows == [[0, 2], [1]]
    assert plan.fill_ratio == pytest.approx(15 / 20)


def test_plan_refuses_long_and_empty_examples():
    with pytest.raises(DataError, match="longer than max_length=4.*example 1 with 5 tokens.*truncate"):
        plan_packing([3, 5], max_length=4)
    with pytest.raises(DataError, match="example 1 has no tokens"):
        plan_packing([3, 0], max_length=4)


def test_row_resets_positions_numbers_documents_and_masks_each_first_label():
    row = pack_row([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8]}, {"input_ids": [9, 10]}], length=8)
    assert row["input_ids"] == [5, 6, 7, 8, 9, 10, 0, 0]
    assert row["position_ids"] == [0, 1, 2, 0, 0, 1, 0, 1]
    assert row["seq_idx"] == [0, 0, 0, 1, 2, 2, 3, 3]
    assert row["labels"] == [IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX, 10, IGNORE_INDEX, IGNORE_INDEX]


def test_shifted_labels_never_target_the_next_document():
    """HF's causal-LM loss shifts labels left by one: a document's last token must predict nothing."""
    batch = collate_packed([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}])
    shifted = torch.nn.functional.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[0, 1:]
    last_of_first = 2
    assert shifted[last_of_first] == IGNORE_INDEX
    assert shifted.tolist() == [6, 7, IGNORE_INDEX, 9, IGNORE_INDEX]


def test_collate_examples_gives_one_padding_free_row():
    batch = collate_packed([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}], cu_seq_lens=True)
    assert set(batch) >= {"input_ids", "labels", "position_ids", "seq_idx"} and "attention_mask" not in batch
    assert batch["input_ids"].shape == (1, 5) and batch["seq_idx"].dtype == torch.int32
    assert batch["seq_idx"].tolist() == [[0, 0, 0, 1, 1]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5] and batch["max_length_q"] == 3


def test_collate_rows_stacks_them_with_a_padding_document():
    examples = [{"input_ids": list(range(5, 5 + n))} for n in (6, 3, 2, 5)]
    rows, plan = pack_examples(examples, max_length=8)
    batch = collate_packed(rows, pad_token_id=0)
    assert batch["input_ids"].shape == (len(plan.rows), 8)
    assert plan.fill_ratio == pytest.approx(16 / (8 * len(plan.rows)))
    for r in range(len(plan.rows)):
        used = sum(len(examples[i]["input_ids"]) for i in plan.rows[r])
        tail = batch["seq_idx"][r, used:]
        assert (tail == len(plan.rows[r])).all() and (batch["labels"][r, used:] == IGNORE_INDEX).all()
        if used < 8:
            assert batch["position_ids"][r, used] == 0


def test_collate_tells_what_is_wrong_with_an_example():
    with pytest.raises(DataError, match="example 1 has no 'input_ids'.*tokenise before packing"):
        collate_packed([{"input_ids": [1]}, {"text": "hi"}])
    with pytest.raises(DataError, match="example 0: 1 labels for 2 input_ids"):
        collate_packed([{"input_ids": [1, 2], "labels": [1]}])
