"""From `data:` config to tokenized train/eval examples plus the validation summary.

    prepared = prepare_datasets(cfg.data, tokenizer, seed=cfg.training.seed)
    print(prepared.summary.format())

Everything that can be wrong with the data fails here, with a DataError naming the file and row,
before a model is loaded. Examples are plain dicts `{"input_ids", "labels"}` so the padding
collator (`collate.py`) and the packing collator consume the same thing.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

from h1tune.data.conversation import Conversation
from h1tune.data.render import (DROP_EMPTY_ASSISTANT, encode_conversation, fit_to_length, has_empty_assistant,
                                split_document)
from h1tune.data.sources import SourceData, apply_weight, read_source
from h1tune.data.summary import DataSummary, SourceStats, SplitStats
from h1tune.errors import DataError

log = logging.getLogger("h1tune")


@dataclass
class PreparedData:
    """Tokenized examples for training and evaluation, and the summary that describes them."""

    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    summary: DataSummary


def tokenize_split(conversations: list[Conversation], tokenizer, data_cfg) -> tuple[list[dict[str, Any]], SplitStats]:
    """Tokenize, label and fit every conversation; count what was kept, truncated and dropped."""
    stats = SplitStats(reasoning_mode=data_cfg.reasoning)
    examples = []
    for conv in conversations:
        stats.formats[conv.format] += 1
        if data_cfg.empty_assistant == "drop" and has_empty_assistant(conv):
            stats.dropped[DROP_EMPTY_ASSISTANT] += 1
            continue
        encoded = encode_conversation(conv, tokenizer, data_cfg)
        traces = sum(1 for m in conv.messages if m.get("reasoning_content"))
        if not conv.is_chat and encoded.length > data_cfg.max_length:
            pieces = split_document(encoded, data_cfg.max_length)  # text: every token is kept, in pieces
            stats.split_pieces += len(pieces) - 1
        else:
            example, reason = fit_to_length(encoded, data_cfg.max_length, data_cfg.truncation)
            if example is None:
                stats.dropped[reason] += 1
                continue
            pieces = [example]
        stats.traces += traces
        stats.traces_rendered += len(encoded.reasoning)
        stats.answer_cut += sum(e.answer_cut for e in pieces)
        for example in pieces:
            stats.reasoning_tokens += example.reasoning_tokens
            examples.append(example.to_dict())
            stats.examples += 1
            stats.tokens += example.length
            stats.trainable_tokens += example.trainable
            stats.truncated += example.truncated
            stats.lengths.append(example.length)
    return examples, stats


def hold_out(sources: list[SourceData], fraction: float, seed: int) -> tuple[list[list[Conversation]], list[Conversation]]:
    """Move a seeded `fraction` of all rows to eval, before weighting, so no repeat leaks into eval."""
    total = sum(len(s.conversations) for s in sources)
    n_eval = max(1, round(fraction * total))
    if n_eval >= total:
        raise DataError(f"data.eval_fraction: {fraction} of {total} rows leaves nothing to train on; "
                        "lower it or give data.eval sources")
    chosen = set(random.Random(f"{seed}:eval").sample(range(total), n_eval))
    train_parts, held = [], []
    index = 0
    for source in sources:
        part = []
        for conv in source.conversations:
            (held if index in chosen else part).append(conv)
            index += 1
        train_parts.append(part)
    return train_parts, held


def source_stats(split: str, source: SourceData, kept: int) -> SourceStats:
    """What one source became: its format, its rows with tools / tool calls / tool results, unused keys."""
    convs = source.conversations
    return SourceStats(
        split, source.path, source.format, len(convs), source.weight, kept,
        tools=sum(1 for c in convs if c.tools),
        tool_calls=sum(1 for c in convs if any(m.get("tool_calls") for m in c.messages)),
        tool_results=sum(1 for c in convs if any(m["role"] == "tool" for m in c.messages)),
        reasoning=sum(1 for c in convs if any(m.get("reasoning_content") for m in c.messages)),
        unused_keys=dict(source.unused_keys))


def prepare_datasets(data_cfg, tokenizer, seed: int) -> PreparedData:
    """Read, mix, split, tokenize and summarise the `data:` section (a DataConfig)."""
    if not data_cfg.train:
        raise DataError("data.train: no training data; set it to a file (json, jsonl, csv, parquet) "
                        "or a Hugging Face dataset id")
    train_sources = [read_source(s) for s in data_cfg.train]
    eval_sources = [read_source(s) for s in data_cfg.eval]

    held_out: list[Conversation] = []
    train_parts = [s.conversations for s in train_sources]
    if not eval_sources and data_cfg.eval_fraction > 0:
        train_parts, held_out = hold_out(train_sources, data_cfg.eval_fraction, seed)

    stats_rows: list[SourceStats] = []
    train_convs: list[Conversation] = []
    for index, (source, part) in enumerate(zip(train_sources, train_parts)):
        mixed = apply_weight(part, source.weight, seed, key=f"train:{index}:{source.path}")
        stats_rows.append(source_stats("train", source, len(mixed)))
        train_convs += mixed
    eval_convs = list(held_out)
    for index, source in enumerate(eval_sources):
        mixed = apply_weight(source.conversations, source.weight, seed, key=f"eval:{index}:{source.path}")
        stats_rows.append(source_stats("eval", source, len(mixed)))
        eval_convs += mixed

    if not train_convs:
        raise DataError("data.train: the sources give no rows after weighting; raise their `weight`")
    train, train_stats = tokenize_split(train_convs, tokenizer, data_cfg)
    eval_examples, eval_stats = tokenize_split(eval_convs, tokenizer, data_cfg) if eval_convs else ([], None)
    if not train:
        reasons = ", ".join(f"{n} {why}" for why, n in train_stats.dropped.items())
        raise DataError(f"data.train: no training examples left ({reasons}); check data.max_length "
                        f"({data_cfg.max_length}), data.truncation and that rows have assistant turns")
    cut = train_stats.answer_cut + (eval_stats.answer_cut if eval_stats else 0)
    if cut:
        log.warning("%d examples lost the end of their last assistant answer to data.max_length (%d): they train on "
                    "a cut answer (a long reasoning trace pushes it out); raise data.max_length, or set "
                    "data.truncation: drop to leave them out", cut, data_cfg.max_length)
    summary = DataSummary(sources=stats_rows, train=train_stats, eval=eval_stats,
                          max_length=data_cfg.max_length, truncation=data_cfg.truncation,
                          assistant_only_loss=data_cfg.assistant_only_loss, eval_held_out=len(held_out))
    return PreparedData(train=train, eval=eval_examples, summary=summary)


def validate_data(data_cfg, tokenizer, seed: int = 42) -> DataSummary:
    """The full preparation, keeping only the summary (for callers that need no examples)."""
    return prepare_datasets(data_cfg, tokenizer, seed).summary
