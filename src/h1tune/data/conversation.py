"""The one structure every data format parses into: a `Conversation`.

Messages follow the Hugging Face chat-template convention (`role`, `content`, assistant
`tool_calls` as `{"type": "function", "function": {"name", "arguments"}}`), so any model's own
chat template can render them. Each conversation remembers its file and row so later errors
(a template that cannot render it, a row that never trains) can point back at the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, get_args

from h1tune.config import DataFormat
from h1tune.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
FORMATS = tuple(f for f in get_args(DataFormat) if f != "auto")


@dataclass
class Conversation:
    """A chat (``messages``) or, for the ``text`` format, a plain document (``text``)."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[Any] | None = None
    text: str | None = None
    format: str = "messages"
    source: str = "<memory>"
    row: int = 0
    line: int | None = None  # JSON-lines/CSV files: the line in the file, which is what an editor shows

    @property
    def where(self) -> str:
        """`file.jsonl:12` for line-based files, `file.json row 3` otherwise."""
        return f"{self.source}:{self.line}" if self.line is not None else f"{self.source} row {self.row}"

    @property
    def is_chat(self) -> bool:
        return self.text is None


def raise_problems(problems: list[str], limit: int = 10) -> None:
    """Raise one DataError listing every problem found (the first `limit`), like ConfigError does."""
    if not problems:
        return
    shown = problems[:limit]
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    if len(problems) == 1:
        raise DataError(problems[0])
    body = "\n".join(f"  - {p}" for p in shown)
    raise DataError(f"bad training data ({len(problems)} problems):\n{body}{more}")
