"""The data validation summary printed before training (and by `h1tune check`).

It answers "is this the data I meant?" before any GPU time is spent: how many rows each source
gave, which formats were detected, how many tokens will actually be trained, what truncation
cost, and how long the examples are (a text histogram, so padding waste and a too-small
max_length are visible at a glance).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class SourceStats:
    """One source: rows read, the format used, its weight and the conversations it gave."""

    split: str
    path: str
    format: str
    rows: int
    weight: float
    conversations: int
    tools: int = 0  # rows that declare tools
    tool_calls: int = 0  # rows with an assistant tool call
    tool_results: int = 0  # rows with a tool response turn
    unused_keys: dict[str, int] = field(default_factory=dict)  # keys the format ignores -> rows
    unpaired: int = 0  # kto: pairs split into a desirable and an undesirable example each
    reasoning: int = 0  # rows with a reasoning trace on an assistant turn


@dataclass
class SplitStats:
    """Token accounting for the train or the eval examples."""

    formats: Counter = field(default_factory=Counter)  # conversations per format, after weighting
    examples: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    truncated: int = 0
    split_pieces: int = 0  # extra pieces from plain-text documents longer than max_length
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    lengths: list[int] = field(default_factory=list)
    traces: int = 0  # reasoning traces in the kept conversations' assistant turns
    traces_rendered: int = 0  # of those, rendered by the template (data.reasoning: train / mask)
    reasoning_tokens: int = 0  # tokens of the rendered traces (tags included), kept after truncation
    reasoning_mode: str = "train"  # data.reasoning: train, mask (rendered, not trained) or drop (not rendered)
    answer_cut: int = 0  # truncated examples whose last assistant turn lost trained tokens

    @property
    def conversations(self) -> int:
        return sum(self.formats.values())


@dataclass
class DataSummary:
    """Everything `format()` prints; also what tests assert on."""

    sources: list[SourceStats]
    train: SplitStats
    eval: SplitStats | None
    max_length: int
    truncation: str
    assistant_only_loss: bool
    eval_held_out: int = 0  # rows moved from train to eval by data.eval_fraction

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.sources)

    def format(self) -> str:
        return format_summary(self)


def _num(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def histogram(lengths: list[int], max_length: int, width: int = 30) -> list[str]:
    """Power-of-two length buckets up to max_length, one text bar each (empty outer buckets hidden)."""
    if not lengths:
        return ["  (no examples)"]
    edges, edge = [], 32
    while edge < max_length:
        edges.append(edge)
        edge *= 2
    edges.append(max_length)
    counts = [0] * len(edges)
    for n in lengths:
        counts[next(i for i, e in enumerate(edges) if n <= e or i == len(edges) - 1)] += 1
    used = [i for i, c in enumerate(counts) if c]
    top = max(counts)
    lines = []
    for i in range(used[0], used[-1] + 1):
        low = 1 if i == 0 else edges[i - 1] + 1
        bar = "#" * max(1 if counts[i] else 0, round(width * counts[i] / top))
        lines.append(f"  {low:>6}-{edges[i]:<6} {counts[i]:>7,}  {bar}")
    return lines


def format_summary(summary: DataSummary) -> str:
    """A small text table: sources, then train/eval token accounting, then the length histogram."""
    out = ["data sources"]
    for s in summary.sources:
        weight = f"  weight {s.weight:g}" if s.weight != 1.0 else ""
        unit = "documents" if s.format == "text" else "conversations"
        out.append(f"  {s.split:<5} {s.path}  [{s.format}]  {s.rows:,} rows{weight} -> {s.conversations:,} {unit}")
        if s.tools or s.tool_calls or s.tool_results:
            out.append(f"        rows with tools {s.tools:,}, with tool calls {s.tool_calls:,}, "
                       f"with tool responses {s.tool_results:,}")
        if s.reasoning:
            out.append(f"        rows with reasoning traces {s.reasoning:,}")
        if s.unused_keys:
            out.append("        ignored keys (not read by this format): "
                       + ", ".join(f"{k!r} in {n:,} rows" for k, n in s.unused_keys.items()))
    if summary.eval_held_out:
        out.append(f"  eval  {summary.eval_held_out:,} rows held out from train (data.eval_fraction)")

    train, ev = summary.train, summary.eval
    formats = sorted(set(train.formats) | set(ev.formats if ev else ()))
    dropped = sorted(set(train.dropped) | set(ev.dropped if ev else ()))
    text_only = formats == ["text"]
    loss = "all tokens" if text_only or not summary.assistant_only_loss else (
        "assistant tokens" + (", all text tokens" if "text" in formats else ""))
    unit = "documents" if text_only else "conversations"
    rows: list[tuple[str, int | None, int | None]] = [(unit, train.conversations, ev and ev.conversations)]
    rows += [(f"  {f}", train.formats[f], ev and ev.formats[f]) for f in formats]
    rows += [
        ("examples kept", train.examples, ev and ev.examples),
        ("tokens", train.tokens, ev and ev.tokens),
        (f"trainable tokens ({loss})", train.trainable_tokens, ev and ev.trainable_tokens),
        *_reasoning_rows(summary),
        (f"truncated to {summary.max_length:,}", train.truncated, ev and ev.truncated),
        *([("  of which the last answer was cut", train.answer_cut, ev and ev.answer_cut)]
          if train.answer_cut or (ev and ev.answer_cut) else []),
        *([(f"extra pieces (documents split at {summary.max_length:,})", train.split_pieces,
            ev and ev.split_pieces)] if "text" in formats else []),
        ("dropped", sum(train.dropped.values()), ev and sum(ev.dropped.values())),
    ]
    rows += [(f"  {reason}", train.dropped[reason], ev and ev.dropped[reason]) for reason in dropped]
    label_width = max(len(r[0]) for r in rows) + 2
    out.append("")
    out.append(f"{'':<{label_width}}{'train':>12}{'eval':>12}")
    for label, a, b in rows:
        out.append(f"{label:<{label_width}}{_num(a):>12}{_num(b):>12}")
    if train.lengths:
        share = 100.0 * train.trainable_tokens / max(train.tokens, 1)
        out.append(f"  mean length {train.tokens / train.examples:,.0f}, max {max(train.lengths):,}, "
                   f"{share:.0f}% of tokens trained")
    out.append("")
    out.append(f"train token lengths (max_length {summary.max_length:,}, truncation: {summary.truncation})")
    out += histogram(train.lengths, summary.max_length)
    return "\n".join(out)


def _reasoning_rows(summary: DataSummary) -> list[tuple[str, int | None, int | None]]:
    """Traces in the data, how many were rendered, and their tokens against the answers'."""
    train, ev = summary.train, summary.eval
    if not (train.traces or (ev and ev.traces)):
        return []
    how = {"train": "trained", "mask": "rendered, not trained (data.reasoning: mask)",
           "drop": "none: data.reasoning: drop"}[train.reasoning_mode]

    def outside(split: SplitStats) -> int:
        return split.trainable_tokens - (split.reasoning_tokens if split.reasoning_mode == "train" else 0)

    return [("reasoning traces (assistant turns)", train.traces, ev and ev.traces),
            ("  rendered (templates may leave earlier turns' out)", train.traces_rendered, ev and ev.traces_rendered),
            (f"  reasoning tokens, {how}", train.reasoning_tokens, ev and ev.reasoning_tokens),
            ("trained tokens outside reasoning (answers, end markers)", outside(train), ev and outside(ev))]
