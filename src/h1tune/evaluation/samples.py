"""Generations from each model on the same prompts, saved with the settings that produced them.

    prompts = read_prompts("prompts.jsonl")
    rows = generate_samples(spec, model, tokenizer, prompts, SamplingConfig())   # greedy by default
    write_samples("eval_samples.jsonl", rows); print(format_samples(prompts, rows))

A prompts file is a .txt file (one prompt per line) or rows in any supported data format; a row's
last assistant turn, when it has one, is kept as the reference answer and not shown to the model.
Prompt-only rows (`{"prompt": ...}`, or Alpaca rows without `output`) are accepted too.
Generation is `h1tune.generate.generate_reply`: the chat template, stop at the end-of-turn token,
greedy unless a temperature is set, and then seeded.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from h1tune.errors import DataError

PROMPT_ONLY = {"prompt": "completion", "instruction": "output"}  # key -> the answer key it may lack


@dataclass(frozen=True)
class Prompt:
    """The messages the model sees, the tools it may call, and the reference reply if the file had one."""

    messages: list[dict[str, Any]]
    tools: list[Any] | None = None
    reference: str | None = None

    @property
    def user_text(self) -> str:
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else self.messages[-1]["content"]


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a .txt file or a data file; every bad row is reported at once.

    Raises:
        DataError: the file is missing, empty, or has rows that are not prompts.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--samples {str(path)!r}: no such file; give a .txt (one prompt per line) or a "
                        ".jsonl/.json/.csv/.parquet file in a supported data format")
    if path.suffix.lower() == ".txt":
        prompts = [Prompt([{"role": "user", "content": line.strip()}])
                   for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        prompts = _prompts_from_rows(path)
    if not prompts:
        raise DataError(f"--samples {path}: no prompts in the file")
    return prompts


def _prompts_from_rows(path: Path) -> list[Prompt]:
    from h1tune.data.conversation import raise_problems
    from h1tune.data.formats import RowError, describe_formats, detect_format, to_conversation
    from h1tune.data.sources import read_rows

    prompts, problems = [], []
    for number, (row, line) in enumerate(read_rows(path), start=1):
        where = f"{path}:{line}" if line is not None else f"{path} row {number}"
        if isinstance(row, dict):
            row = {**row, **{answer: "" for key, answer in PROMPT_ONLY.items() if key in row and answer not in row}}
        fmt = detect_format(row)
        if fmt is None:
            problems.append(f"{where}: not a prompt; expected one of — {describe_formats()}")
            continue
        try:
            prompts.append(_to_prompt(to_conversation(row, fmt, str(path), number, line)))
        except (RowError, ValueError) as exc:
            problems.append(f"{where}: {exc}")
    raise_problems(problems)
    return prompts


def _to_prompt(conversation) -> Prompt:
    """The conversation up to its last assistant turn, which becomes the reference."""
    if not conversation.is_chat:
        return Prompt([{"role": "user", "content": conversation.text}])
    messages = list(conversation.messages)
    reference = None
    if messages and messages[-1]["role"] == "assistant":
        reference = messages.pop()["content"] or None
    if not messages or messages[-1]["role"] not in ("user", "tool"):
        raise ValueError("has no user turn to answer")
    return Prompt(messages, conversation.tools, reference)


def generate_samples(name: str, model, tokenizer, prompts: list[Prompt], sampling) -> list[dict[str, Any]]:
    """One JSON-ready row per prompt: the model, the prompt, its reply, and the sampling settings.

    Prompt i is sampled with seed `sampling.seed + i`, so each row is reproducible on its own.
    """
    from h1tune.generate import SamplingConfig, generate_reply

    rows = []
    for index, prompt in enumerate(prompts):
        settings = SamplingConfig(**{**asdict(sampling), "seed": sampling.seed + index})
        reply = generate_reply(model, tokenizer, prompt.messages, settings, stream=False, tools=prompt.tools)
        rows.append({"model": name, "prompt_index": index, "messages": prompt.messages,
                     "reference": prompt.reference, "reply": reply, "sampling": asdict(settings)})
    return rows


def write_samples(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """All models' rows as JSON lines, written atomically."""
    from h1tune.atomic import write_text_atomic

    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def format_samples(prompts: list[Prompt], rows: list[dict[str, Any]], width: int = 100) -> str:
    """Each prompt, then every model's reply (and the reference) under it, side by side."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    label = max([len(m) for m in models] + [len("reference")])
    replies = {(r["model"], r["prompt_index"]): r["reply"] for r in rows}
    lines = []
    for index, prompt in enumerate(prompts):
        lines.append(f"[{index + 1}] {_one_line(prompt.user_text, width)}")
        answers = [(m, replies.get((m, index), "")) for m in models]
        if prompt.reference is not None:
            answers.append(("reference", prompt.reference))
        for who, text in answers:
            body = textwrap.wrap(_one_line(text, 3 * width), width) or [""]
            lines.append(f"  {who:<{label}} | {body[0]}")
            lines += [f"  {'':<{label}} | {more}" for more in body[1:]]
    return "\n".join(lines)


def _one_line(text: str, limit: int) -> str:
    """Whitespace folded to single spaces; a reply that is only whitespace shown as its characters
    (`⏎⏎`, `·`, `→`), an empty one as `(empty)`, so neither looks like a missing row."""
    text = str(text)
    if not text.strip():
        return "".join({"\n": "⏎", "\t": "→"}.get(c, "·") for c in text)[:limit] or "(empty)"
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"
