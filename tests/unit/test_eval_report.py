"""The `h1tune eval` table and JSON report: one column per model, stderr beside its metric, every number
written, and the side-by-side samples view."""

from __future__ import annotations

import json
import math
import re

from h1tune.evaluation import LossResult, ModelResult, ModelSpec, format_table, write_report
from h1tune.evaluation.samples import Prompt, format_samples


def results() -> list[ModelResult]:
    base = ModelResult(ModelSpec("tiny", "tiny", "model"), LossResult(loss=6.5, tokens=1234, examples=32, rows=32),
                       tasks={"mc": {"acc": 0.25, "acc_stderr": 0.1, "acc_norm": 0.5}})
    tuned = ModelResult(ModelSpec("runs/sft", "runs/sft/final", "adapter", "tiny"),
                        LossResult(loss=2.0, tokens=1234, examples=32, rows=9), tasks={"mc": {"acc": 0.75}})
    return [base, tuned]


def test_table_has_a_column_per_model_and_a_row_per_measure():
    lines = format_table(results()).splitlines()
    assert lines[0].split() == ["tiny", "runs/sft"] and set(lines[1]) == {"-", " "}
    rows = {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line) for line in lines[2:])}
    assert rows["held-out loss"] == ["6.5000", "2.0000"]
    assert rows["perplexity"] == [f"{math.exp(6.5):.2f}", f"{math.exp(2.0):.2f}"]
    assert rows["scored tokens"] == ["1,234", "1,234"]
    assert rows["mc acc"] == ["0.2500 ± 0.1000", "0.7500"]
    assert rows["mc acc_norm"] == ["0.5000", "-"]
    assert not any("stderr" in line for line in lines)
    widths = {len(line) for line in lines[:1] + lines[2:]}
    assert len(widths) == 1, "columns are right-aligned to one width"


def test_table_without_held_out_data_shows_only_tasks():
    only_tasks = [ModelResult(ModelSpec("m", "m", "model"), tasks={"mc": {"acc": 1.0}})]
    text = format_table(only_tasks)
    assert "held-out loss" not in text and "mc acc" in text and "1.0000" in text


def test_json_report_holds_every_number_and_the_settings(tmp_path):
    path = write_report(tmp_path / "out" / "eval.json", results(), {"data": {"eval": ["x.jsonl"]}, "seed": 42})
    data = json.loads(path.read_text())
    assert data["settings"]["seed"] == 42
    base, tuned = data["models"]
    assert tuned == {"name": "runs/sft", "path": "runs/sft/final", "kind": "adapter", "base": "tiny",
                     "heldout": {"loss": 2.0, "tokens": 1234, "examples": 32, "rows": 9, "dropped": 0,
                                 "perplexity": math.exp(2.0)},
                     "tasks": {"mc": {"acc": 0.75}}, "samples": 0}
    assert base["heldout"]["perplexity"] == math.exp(6.5)
    assert not list(tmp_path.joinpath("out").glob(".*tmp*")), "no temporary file left behind"


def test_samples_are_shown_under_each_prompt_with_the_reference():
    prompts = [Prompt([{"role": "user", "content": "Capital of\nFrance?"}], reference="Paris."),
               Prompt([{"role": "user", "content": "Hi"}])]
    rows = [{"model": m, "prompt_index": i, "reply": f"{m} says {i}"} for m in ("tiny", "runs/sft") for i in (0, 1)]
    text = format_samples(prompts, rows)
    assert text.splitlines() == [
        "[1] Capital of France?",
        "  tiny      | tiny says 0",
        "  runs/sft  | runs/sft says 0",
        "  reference | Paris.",
        "[2] Hi",
        "  tiny      | tiny says 1",
        "  runs/sft  | runs/sft says 1",
    ]
