"""The side-by-side table and the JSON file of an `h1tune eval` run.

    results = [ModelResult(spec, loss=LossResult(...), tasks={"arc_easy": {"acc": 0.6}})]
    print(format_table(results))
    write_report("eval.json", results, settings={...})

One column per model, one row per measure: held-out loss, perplexity, scored tokens, then each
task metric. A stderr is shown next to its metric (`0.610 ± 0.014`) rather than as its own row.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from h1tune.evaluation.loss import LossResult
from h1tune.evaluation.models import ModelSpec

STDERR = "_stderr"


@dataclass
class ModelResult:
    """Everything measured for one model."""

    spec: ModelSpec
    loss: LossResult | None = None
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.spec.name, "path": self.spec.path, "kind": self.spec.kind, "base": self.spec.base,
                "heldout": self.loss.as_dict() if self.loss else None, "tasks": self.tasks, "samples": self.samples}


def _number(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1000:
        return f"{int(value):,}"
    return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.4g}"


def table_rows(results: list[ModelResult]) -> list[tuple[str, list[str]]]:
    """(measure, one cell per model) for every measure any model has."""
    rows: list[tuple[str, list[str]]] = []
    if any(r.loss for r in results):
        rows.append(("held-out loss", [_number(r.loss.loss if r.loss else None) for r in results]))
        rows.append(("perplexity", [_number(r.loss.perplexity if r.loss else None, 2) for r in results]))
        rows.append(("scored tokens", [_number(r.loss.tokens if r.loss else None) for r in results]))
        rows.append(("examples", [_number(r.loss.examples if r.loss else None) for r in results]))
        if any(r.loss and r.loss.dropped for r in results):  # too long, or nothing scored: not in the loss
            rows.append(("dropped", [_number(r.loss.dropped if r.loss else None) for r in results]))
    tasks = list(dict.fromkeys(t for r in results for t in r.tasks))
    for task in tasks:
        metrics = list(dict.fromkeys(m for r in results for m in r.tasks.get(task, {}) if STDERR not in m))
        for metric in metrics:
            cells = []
            for r in results:
                values = r.tasks.get(task, {})
                value, err = values.get(metric), values.get(_stderr_key(metric))
                cells.append(_number(value) + (f" ± {_number(err)}" if value is not None and err is not None else ""))
            rows.append((f"{task} {metric}", cells))
    return rows


def _stderr_key(metric: str) -> str:
    """`acc` -> `acc_stderr`; `exact_match (strict)` -> `exact_match_stderr (strict)`."""
    name, paren, rest = metric.partition(" (")
    return f"{name}{STDERR}{paren}{rest}"


def format_table(results: list[ModelResult]) -> str:
    """A plain-text table, one column per model (named as given on the command line)."""
    rows = table_rows(results)
    header = ["", *[r.spec.name for r in results]]
    body = [[name, *cells] for name, cells in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(b) for b in body)])


def report_dict(results: list[ModelResult], settings: dict[str, Any]) -> dict[str, Any]:
    return {"settings": settings, "models": [r.as_dict() for r in results]}


def write_report(path: str | Path, results: list[ModelResult], settings: dict[str, Any]) -> Path:
    """The JSON report, written atomically (an interrupted run never leaves half a file)."""
    from h1tune.atomic import write_text_atomic

    return write_text_atomic(path, json.dumps(report_dict(results, settings), indent=2, ensure_ascii=False) + "\n")
