"""From tokenised examples to what the Trainer iterates: padded batches, or exactly packed rows.

Packed rows carry position ids that restart per document and a `seq_idx` that h1tune's Mamba
path (h1tune.ssm) uses to restart the conv and the scan at every boundary; no attention mask, so
transformers builds a block-diagonal causal mask from the position ids.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch

from h1tune.config import DataConfig, TrainingConfig
from h1tune.data import pad_collate
from h1tune.data.render import IGNORE_INDEX

PROBE_EXAMPLES = 2
PROBE_MAX_TOKENS = 64  # per example: the probe needs a real batch on the training path, not a long one

log = logging.getLogger("h1tune")


@dataclass
class Batches:
    """Train and eval items for the Trainer, the collator that batches them, and how full they are."""

    train: list[Any]
    eval: list[Any] | None
    collator: Callable[[list[Any]], dict[str, torch.Tensor]]
    row_tokens: float  # mean tokens per train item (a packed row or one example)
    probe_items: list[Any]  # a few short training examples, batched by `probe_collator`
    probe_collator: Callable[[list[Any]], dict[str, torch.Tensor]]
    # tokens one item puts through the model (a DPO pair: two padded sequences, train/preference.py)
    item_tokens: Callable[[Any], int] = lambda item: len(item["input_ids"])  # noqa: E731

    def probe_batch(self) -> dict[str, torch.Tensor]:
        """A short real batch for the adapter probe, built like the training batches (packed or padded).

        Two short examples rather than whole training rows: the probe costs a few forwards, and
        on a 128-row job two 512-token packed rows made it a quarter of the run.
        """
        return self.probe_collator(self.probe_items)

    def micro_batch_tokens(self, training: TrainingConfig) -> int:
        """The most tokens one forward/backward holds (padded batches pad to their longest item)."""
        return training.per_device_train_batch_size * max((self.item_tokens(item) for item in self.train), default=1)

    def tokens_per_step(self, training: TrainingConfig) -> int:
        """Tokens in one optimiser step (TII's learning-rate rule scales with it)."""
        per_step = training.per_device_train_batch_size * training.gradient_accumulation_steps
        return max(1, round(per_step * self.row_tokens))


def make_batches(data_cfg: DataConfig, tokenizer, train: list[dict], eval_: list[dict] | None) -> Batches:
    """Padded batches, or packed rows of `data.max_length` when `data.packing` is on."""
    pad_id = tokenizer.pad_token_id
    eval_items = eval_ or None
    probe = probe_examples(train)
    if not data_cfg.packing:
        mean = sum(len(e["input_ids"]) for e in train) / max(1, len(train))
        collate = partial(pad_collate, pad_token_id=pad_id)
        return Batches(train, eval_items, collate, mean, probe, collate)

    from h1tune import ssm
    from h1tune.data.packing import collate_packed, pack_examples

    ssm.install()
    rows, plan = pack_examples(train, data_cfg.max_length)
    eval_rows = pack_examples(eval_items, data_cfg.max_length)[0] if eval_items else None
    log.info("packing: %d examples into %d rows of %d tokens, %.1f%% full", len(train), len(rows),
             data_cfg.max_length, 100 * plan.fill_ratio)
    mean = plan.num_tokens / max(1, len(rows))
    collate = partial(collate_packed, pad_token_id=pad_id)
    probe_rows = pack_examples(probe, sum(len(e["input_ids"]) for e in probe))[0]  # one packed row, boundaries kept
    return Batches(rows, eval_rows, collate, mean, probe_rows, collate)


def probe_examples(train: list[dict], count: int = PROBE_EXAMPLES, max_tokens: int = PROBE_MAX_TOKENS) -> list[dict]:
    """`count` short windows of training examples, each ending inside its labelled tokens.

    A window is the first labelled span (up to half the budget) with as much context before it
    as the rest of the budget allows. Cutting every example at its start instead gave batches
    without a single labelled token whenever the answer starts late (a system prompt, tool
    schemas, a long instruction): zero loss, zero gradients, and every adapter called inert.
    Examples with no labelled token are never chosen; if none has one, an empty list.
    """
    by_length = sorted(range(len(train)), key=lambda i: len(train[i]["input_ids"]))
    windows = []
    for i in by_length:
        window = labelled_window(train[i], max_tokens)
        if window is not None:
            windows.append(window)
            if len(windows) == count:
                break
    return windows


def labelled_window(example: dict, max_tokens: int) -> dict | None:
    """At most `max_tokens` consecutive tokens of `example` that include labelled ones, or None."""
    labels = list(example["labels"])
    first = next((i for i, label in enumerate(labels) if i > 0 and label != IGNORE_INDEX), None)
    if first is None:  # position 0 has no token before it to predict it from: never trained
        return None
    end = min(len(labels), first + max(1, max_tokens // 2))
    start = max(0, min(first - 1, end - max_tokens))  # a window's first label is never scored (shift by one)
    return {"input_ids": list(example["input_ids"])[start:end], "labels": labels[start:end]}
