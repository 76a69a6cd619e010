"""What became of every field of an OUMI config: mapped, made safe, not honoured, or ignored.

    report.format()      # the block `h1tune train OUMI.yaml` prints before anything runs
    report.as_table()    # the same as a Markdown table (OUMI field -> h1tune field, or why not)

A user running someone else's recipe must see where h1tune differs from what the file asks, so
each entry carries the OUMI field, its value (or OUMI's default when the file leaves it out) and
either the h1tune field it became or the reason it did not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

# Entry kinds, in the order the report shows them.
MAPPED = "mapped"  # became an h1tune field with the same meaning
SAFETY = "safety"  # mapped, then changed by one of h1tune's guarantees
NOT_HONOURED = "not_honoured"  # asks for something h1tune does differently or not at all
IGNORED = "ignored"  # OUMI machinery with no effect on the job here (speed knobs, logging verbosity, eval-only)
KINDS = (MAPPED, SAFETY, NOT_HONOURED, IGNORED)
TITLES = {
    MAPPED: "mapped",
    SAFETY: "changed by h1tune's guarantees",
    NOT_HONOURED: "NOT honoured (h1tune runs this differently)",
    IGNORED: "ignored (no effect on the job here)",
}


def show_value(value: Any) -> str:
    """A value as it would be written in YAML, on one line."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix(" ...")


@dataclass
class Entry:
    kind: str
    oumi: str  # dotted OUMI field, e.g. peft.lora_r or data.train.datasets.0.dataset_name
    value: Any  # the file's value, or OUMI's default when `default` is True
    h1tune: str | None = None  # dotted h1tune field, for mapped and safety entries
    h1tune_value: Any = None
    reason: str = ""
    default: bool = False  # the file leaves the field out; OUMI's default applies

    def source(self) -> str:
        suffix = " (OUMI default)" if self.default else ""
        return f"{self.oumi} = {show_value(self.value)}{suffix}"

    def line(self) -> str:
        if self.h1tune:
            text = f"{self.source()} -> {self.h1tune} = {show_value(self.h1tune_value)}"
            return f"{text}; {self.reason}" if self.reason else text
        return f"{self.source()}: {self.reason}"


@dataclass
class MappingReport:
    """Every OUMI field of one file (and OUMI's defaults that shape the job) and what h1tune made of it."""

    source: str
    trainer_type: str
    entries: list[Entry] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)

    def add(self, kind: str, oumi: str, value: Any, h1tune: str | None = None, h1tune_value: Any = None,
            reason: str = "", default: bool = False) -> None:
        self.entries.append(Entry(kind, oumi, value, h1tune, h1tune_value, reason, default))

    def of_kind(self, kind: str) -> list[Entry]:
        return [e for e in self.entries if e.kind == kind]

    def find(self, oumi: str) -> Entry | None:
        """The entry of one OUMI field (its last one), or None when the field was never consulted."""
        return next((e for e in reversed(self.entries) if e.oumi == oumi), None)

    def origin(self, h1tune_path: str) -> str | None:
        """The OUMI field an h1tune field came from, for error messages."""
        for entry in reversed(self.entries):
            if entry.h1tune and (h1tune_path == entry.h1tune or h1tune_path.startswith(entry.h1tune + ".")):
                return entry.oumi
        return None

    def format(self) -> str:
        lines = [f"OUMI training config {self.source} ({self.trainer_type}) mapped onto h1tune:"]
        for kind in KINDS:
            entries = self.of_kind(kind)
            if entries:
                lines.append(f"  {TITLES[kind]}:")
                lines += [f"    {e.line()}" for e in entries]
        if self.overrides:
            lines.append("  then --set (h1tune fields): " + ", ".join(self.overrides))
        return "\n".join(lines)

    def as_table(self) -> str:
        """Markdown: one row per entry, for review or an issue's closing note."""
        rows = ["| OUMI field | value | h1tune field / outcome |", "|---|---|---|"]
        for e in self.entries:
            value = show_value(e.value) + (" (default)" if e.default else "")
            if e.h1tune:
                outcome = f"`{e.h1tune}` = `{show_value(e.h1tune_value)}`" + (f"; {e.reason}" if e.reason else "")
            else:
                outcome = f"{TITLES[e.kind].split(' (')[0]}: {e.reason}"
            rows.append(f"| `{e.oumi}` | `{value}` | {outcome.replace('|', '/')} |")
        return "\n".join(rows)

    def as_comments(self) -> str:
        """The report as YAML comments, written above a converted config."""
        return "".join(f"# {line}\n" if line else "#\n" for line in self.format().splitlines())
