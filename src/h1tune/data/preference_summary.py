"""The validation summary of preference data, printed before DPO/KTO training and by `h1tune check`.

Like the SFT summary it answers "is this the data I meant?": rows per source and detected format,
pairs (or desirable / undesirable examples) kept, prompt and completion tokens, what truncation
cost, what was dropped and why, and a histogram of sequence lengths (prompt + one completion).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from h1tune.data.summary import SourceStats, histogram


@dataclass
class PreferenceStats:
    """Token accounting for the train or the eval split of preference data."""

    examples: int = 0  # pairs (dpo) or single completions (kto)
    desirable: int = 0  # kto
    prompt_tokens: int = 0
    chosen_tokens: int = 0  # dpo: chosen completions; kto: desirable completions
    rejected_tokens: int = 0  # dpo: rejected completions; kto: undesirable completions
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    lengths: list[int] = field(default_factory=list)  # each sequence: prompt + one completion

    @property
    def undesirable(self) -> int:
        return self.examples - self.desirable

    def add(self, example: dict, truncated: bool) -> None:
        """Count one kept example (TRL's tokenized layout)."""
        prompt = len(example["prompt_ids"])
        self.examples += 1
        self.truncated += truncated
        self.prompt_tokens += prompt
        if "chosen_ids" in example:
            completions = [len(example["chosen_ids"]), len(example["rejected_ids"])]
            self.chosen_tokens += completions[0]
            self.rejected_tokens += completions[1]
        else:
            completions = [len(example["completion_ids"])]
            self.desirable += bool(example["label"])
            if example["label"]:
                self.chosen_tokens += completions[0]
            else:
                self.rejected_tokens += completions[0]
        self.lengths += [prompt + n for n in completions]


@dataclass
class PreferenceSummary:
    """Everything `format()` prints; also what tests assert on."""

    objective: str
    sources: list[SourceStats]
    train: PreferenceStats
    eval: PreferenceStats | None
    max_length: int
    truncation: str
    eval_held_out: int = 0

    def format(self) -> str:
        return format_summary(self)

    def drop_warning(self) -> str | None:
        """One line naming every drop reason with its count, or None when nothing was dropped."""
        dropped = self.train.dropped + (self.eval.dropped if self.eval else Counter())
        if not dropped:
            return None
        unit = "pairs" if self.objective == "dpo" else "examples"
        reasons = ", ".join(f"{n} {why}" for why, n in dropped.most_common())
        return f"dropped {sum(dropped.values())} {unit}: {reasons}"


def _num(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def format_summary(summary: PreferenceSummary) -> str:
    """Sources, then train/eval token accounting, then the sequence length histogram."""
    unit = "pairs" if summary.objective == "dpo" else "examples"
    out = [f"preference data (objective {summary.objective})"]
    for s in summary.sources:
        weight = f"  weight {s.weight:g}" if s.weight != 1.0 else ""
        made = (f"{s.conversations:,} {unit}" if not s.unpaired else
                f"{s.unpaired:,} pairs, each split into a desirable (chosen) and an undesirable (rejected) example "
                f"-> {s.conversations + s.unpaired:,} examples")
        out.append(f"  {s.split:<5} {s.path}  [{s.format}]  {s.rows:,} rows{weight} -> {made}")
    if summary.eval_held_out:
        out.append(f"  eval  {summary.eval_held_out:,} rows held out from train (data.eval_fraction)")
    train, ev = summary.train, summary.eval
    good, bad = ("chosen", "rejected") if summary.objective == "dpo" else ("desirable", "undesirable")
    rows: list[tuple[str, int | None, int | None]] = [
        (unit, train.examples + sum(train.dropped.values()), ev and ev.examples + sum(ev.dropped.values())),
        (f"{unit} kept", train.examples, ev and ev.examples)]
    if summary.objective != "dpo":
        rows += [("  desirable", train.desirable, ev and ev.desirable),
                 ("  undesirable", train.undesirable, ev and ev.undesirable)]
    rows += [
        ("prompt tokens", train.prompt_tokens, ev and ev.prompt_tokens),
        (f"{good} completion tokens (scored)", train.chosen_tokens, ev and ev.chosen_tokens),
        (f"{bad} completion tokens (scored)", train.rejected_tokens, ev and ev.rejected_tokens),
        (f"truncated to {summary.max_length:,}", train.truncated, ev and ev.truncated),
        ("dropped", sum(train.dropped.values()), ev and sum(ev.dropped.values())),
    ]
    reasons = sorted(set(train.dropped) | set(ev.dropped if ev else ()))
    rows += [(f"  {why}", train.dropped[why], ev and ev.dropped[why]) for why in reasons]
    width = max(len(r[0]) for r in rows) + 2
    out += ["", f"{'':<{width}}{'train':>12}{'eval':>12}"]
    out += [f"{label:<{width}}{_num(a):>12}{_num(b):>12}" for label, a, b in rows]
    out += ["", f"train sequence lengths, prompt + one completion (max_length {summary.max_length:,}, "
                f"truncation: {summary.truncation})"]
    out += histogram(train.lengths, summary.max_length)
    return "\n".join(out)
