"""Read data sources (local JSON, JSON lines, CSV, Parquet, or a Hugging Face dataset id) and mix them.

A path that names a local file is read here with line/row numbers kept for error messages. A path
that does not exist is treated as a Hugging Face dataset id (`datasets.load_dataset(path,
split=...)`) only when it cannot be meant as a file: anything ending in a data-file suffix or
starting with `.`, `/` or `~` fails with "no such file" instead of a confusing hub lookup.

Mixing weights: a source with weight `w` and `n` rows contributes `k = round(w * n)` rows: the
whole source `k // n` times, then a seeded sample (without replacement) of `k % n` rows. So
`w=2` is every row twice, `w=0.5` a fixed half, `w=1.5` every row once plus a fixed half again,
and a tiny `w` can round to zero rows. The same seed always picks the same rows.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TypeVar

from h1tune.data.conversation import FORMATS, Conversation, raise_problems
from h1tune.data.formats import (RowError, describe_formats, detect_format, expected_keys, to_conversation,
                                 unused_keys)
from h1tune.data.preference import sft_refusal
from h1tune.errors import DataError

log = logging.getLogger("h1tune")

FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".md")
TEXT_SUFFIXES = (".txt", ".md")  # plain text: documents by data.text_unit, read as `text` rows
_LOCAL_LOOKING = (".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".parquet", ".txt", ".md", ".arrow")

T = TypeVar("T")


@dataclass
class SourceData:
    """One source after parsing: its conversations (before weighting) and detected format."""

    path: str
    format: str
    weight: float
    conversations: list[Conversation]
    unused_keys: Counter = field(default_factory=Counter)  # key the format ignores -> rows that have it


def read_rows(path: str | Path, text_unit: str | None = None) -> list[tuple[Any, int | None]]:
    """Rows of a local file with their line numbers (None where a row has no single line)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return text_rows(path, _read_text(path), text_unit or "line")
    if suffix == ".jsonl":
        return _read_jsonl(path, _read_text(path))
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; use one of {', '.join(FILE_SUFFIXES)}")


def text_rows(path: Path, text: str, unit: str) -> list[tuple[dict[str, str], int]]:
    """Plain text as `text` rows: a document per non-blank line, per blank-line separated paragraph, or
    the whole file; each with the line it starts on. Nothing inside a document is dropped."""
    if unit == "file":
        return [({"text": text.strip("\n")}, 1)] if text.strip() else []
    rows, block, start = [], [], 0
    for number, line in enumerate(text.splitlines(), start=1):
        if unit == "line":
            if line.strip():
                rows.append(({"text": line}, number))
        elif line.strip():
            block, start = block + [line], start or number
        elif block:
            rows.append(({"text": "\n".join(block)}, start))
            block, start = [], 0
    if block:
        rows.append(({"text": "\n".join(block)}, start))
    return rows


def _text_folder_rows(folder: Path, unit: str) -> tuple[list[tuple[Any, int | None]], list[Path]]:
    """Every .txt/.md file under `folder` (sorted, recursive), as text rows; the files read."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    rows: list[tuple[Any, int | None]] = []
    for path in files:
        rows += [(row, None) for row, _ in text_rows(path, _read_text(path), unit)]
    return rows, files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {exc.start}); re-save it as UTF-8") from None


def _read_jsonl(path: Path, text: str) -> list[tuple[Any, int | None]]:
    rows, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((json.loads(line), number))
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{number}: not valid JSON ({exc.msg}, column {exc.colno})")
    raise_problems(problems)
    return rows


def _read_json(path: Path) -> list[tuple[Any, int | None]]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            return _read_jsonl(path, text)  # JSON lines saved as .json, common in the wild
        raise DataError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
    if isinstance(data, dict):
        return [(data, 1)]
    if not isinstance(data, list):
        raise DataError(f"{path}: the top level must be a list of rows (or one JSON object per line), "
                        f"got {type(data).__name__}")
    return [(row, None) for row in data]


def _read_csv(path: Path) -> list[tuple[Any, int | None]]:
    rows = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        start = 2  # the header is line 1; a quoted cell may span lines, so track where each row began
        try:
            for row in reader:
                rows.append(({k: v for k, v in row.items() if k is not None and v is not None}, start))  # None: no cell
                start = reader.line_num + 1
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataError(f"{path}:{reader.line_num}: not readable as CSV ({exc})") from None
    return rows


def _read_parquet(path: Path) -> list[tuple[Any, int | None]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    return [(row, None) for row in table.to_pylist()]


def _read_hub(path: str, split: str) -> list[tuple[Any, int | None]]:
    try:
        import datasets

        dataset = datasets.load_dataset(path, split=split)
    except Exception as exc:  # network, auth, missing split: all become one clear message
        raise DataError(
            f"{path!r} is not a local file, and loading it as a Hugging Face dataset (split {split!r}) failed: "
            f"{type(exc).__name__}: {exc}. Check the path; offline, point to a local file instead."
        ) from None
    return [(dict(row), None) for row in dataset]


def looks_local(path: str) -> bool:
    """True when a path can only be meant as a file, so it must not fall through to the hub."""
    return path.lower().endswith(_LOCAL_LOOKING) or path.startswith((".", "/", "~", "\\"))


def source_rows(source) -> tuple[str, list[tuple[Any, int | None]]]:
    """The name and rows of one `DataSourceConfig` (a local file, else a hub dataset); SFT and
    preference data read their sources alike."""
    path = Path(source.path).expanduser()
    unit = getattr(source, "text_unit", None) or "line"
    if path.is_dir():
        rows, files = _text_folder_rows(path, unit)
        if not files:
            raise DataError(f"{source.path}: is a directory with no .txt or .md files; a folder is read as a text corpus, "
                            f"other data files ({', '.join(FILE_SUFFIXES[:4])}) are listed as sources one by one")
        log.info("%s: %d text files, %d documents (data.text_unit: %s)", source.path, len(files), len(rows), unit)
    elif path.is_file():
        rows = read_rows(path, unit)
    elif looks_local(source.path):
        raise DataError(f"{source.path}: no such file (cwd: {Path.cwd()}); check the path in data.train / data.eval")
    else:
        rows = _read_hub(source.path, source.split)
    name = str(source.path)
    if not rows:
        raise DataError(f"{name}: no rows; the dataset is empty")
    return name, rows


def parse_rows(name: str, rows: list[tuple[Any, int | None]], fmt: str, parse, detected: bool,
               expected=expected_keys) -> list:
    """`parse(row, fmt, name, row_number, line)` for every row; every bad row reported in one DataError,
    naming the detected format when no row parsed (SFT and preference sources alike)."""
    items, problems = [], []
    for number, (row, line) in enumerate(rows, start=1):
        try:
            items.append(parse(row, fmt, name, number, line))
        except RowError as exc:
            where = f"{name}:{line}" if line is not None else f"{name} row {number}"
            problems.append(f"{where}: {exc}")
    if problems and not items and detected:
        problems.append(f"{name}: detected format {fmt!r} (keys {expected(fmt)}) from the first row")
    raise_problems(problems)
    return items


def read_source(source) -> SourceData:
    """Read and parse one `DataSourceConfig`; every bad row is reported in one DataError."""
    name, rows = source_rows(source)
    refusal = sft_refusal(name, rows[0][0])  # preference rows read as SFT would train on the wrong text
    if refusal:
        raise DataError(refusal)

    fmt = source.format
    if fmt == "auto":
        first = rows[0][0]
        fmt = detect_format(first)
        if fmt is None:
            keys = ", ".join(repr(k) for k in first) if isinstance(first, dict) else type(first).__name__
            raise DataError(f"{name}: cannot tell the data format from the first row (keys: {keys}); "
                            f"expected one of — {describe_formats()}; or set `format:` on this source")
    if fmt not in FORMATS:
        raise DataError(f"{name}: unknown format {fmt!r}; choose from {', '.join(FORMATS)}")

    unused = Counter(key for row, _ in rows for key in unused_keys(row, fmt))
    conversations = parse_rows(name, rows, fmt, to_conversation, detected=source.format == "auto")
    if unused:
        log.warning("%s: format %r does not use %s; those fields are ignored (set `format:` on this source if "
                    "the detection is wrong)", name, fmt,
                    ", ".join(f"{key!r} ({count:,} rows)" for key, count in unused.most_common()))
    return SourceData(path=name, format=fmt, weight=source.weight, conversations=conversations, unused_keys=unused)


def apply_weight(items: Sequence[T], weight: float, seed: int, key: str) -> list[T]:
    """`round(weight * len(items))` items: whole repeats plus a seeded sample of the remainder."""
    n = len(items)
    if n == 0 or weight == 1.0:
        return list(items)
    repeats, remainder = divmod(round(weight * n), n)
    picked = sorted(random.Random(f"{seed}:{key}").sample(range(n), remainder))
    return list(items) * repeats + [items[i] for i in picked]


def load_conversations(sources: list, seed: int) -> list[Conversation]:
    """Every source read, parsed and weighted, in order (see the module docstring for weights)."""
    out: list[Conversation] = []
    for index, source in enumerate(sources):
        data = read_source(source)
        out += apply_weight(data.conversations, data.weight, seed, key=f"train:{index}:{data.path}")  # as prepare_datasets
    return out
