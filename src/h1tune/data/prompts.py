"""GRPO's data: prompts (a string or messages) and the columns the rewards read.

    {"prompt": "What is 17 + 25?", "answer": "42"}                         any extra column reaches the rewards
    {"prompt": [{"role": "system", ...}, {"role": "user", ...}], "tools": [...]}
    {"question": "...", "answer": "... #### 42"}                            GSM8K, detected

Rows become `{"prompt": [messages], **columns}`: TRL's conversational prompts, rendered with the
model's chat template and its generation prompt. A prompt whose rendering leaves fewer than
`training.max_completion_length` tokens of `data.max_length` is dropped and counted (a cut prompt
would ask another question). Everything is checked before a model loads, like SFT data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from h1tune.data.formats import RowError, messages_list
from h1tune.data.preference import is_prompt_row
from h1tune.data.render import render, with_system_prompt
from h1tune.data.sources import apply_weight, parse_rows, source_rows
from h1tune.data.summary import histogram
from h1tune.errors import DataError

GSM8K = "gsm8k"
PROMPT = "prompt"
DROP_PROMPT_TOO_LONG = "prompt leaves no room for max_completion_length"


@dataclass
class PromptSummary:
    sources: list[tuple[str, str, int]]  # (path, format, rows)
    kept: int
    dropped: dict[str, int]
    columns: list[str]
    lengths: list[int]
    max_length: int
    max_completion_length: int
    eval_kept: int = 0

    def format(self) -> str:
        out = ["prompt data (objective grpo)"]
        out += [f"  train {path}  [{fmt}]  {rows:,} rows" for path, fmt, rows in self.sources]
        out.append(f"  prompts kept {self.kept:,}" + (f", eval {self.eval_kept:,}" if self.eval_kept else ""))
        out += [f"  dropped {n:,}: {why}" for why, n in self.dropped.items()]
        out.append(f"  columns the rewards receive: {', '.join(self.columns) or 'none'}")
        out.append(f"prompt token lengths (completions up to {self.max_completion_length:,}; max_length "
                   f"{self.max_length:,})")
        return "\n".join(out + histogram(self.lengths, self.max_length))


@dataclass
class PreparedPrompts:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    summary: PromptSummary
    prompt_ids: list[list[int]] = field(default_factory=list)  # train prompts as rendered (the probe's input)


def parse_prompt_row(row: Any, fmt: str, source: str, number: int, line: int | None) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise RowError(f"expected an object with 'prompt' (or GSM8K's 'question' and 'answer'), got {type(row).__name__}")
    if fmt == GSM8K:
        if not isinstance(row.get("question"), str):
            raise RowError("'question' must be a string")
        return {"prompt": [{"role": "user", "content": row["question"]}],
                **{k: v for k, v in row.items() if k != "question"}}
    value = row.get("prompt")
    if isinstance(value, str):
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list):
        messages = messages_list(value, "prompt")
    else:
        raise RowError(f"'prompt' must be a string or a list of messages, got {type(value).__name__}")
    if not messages or messages[-1]["role"] == "assistant":
        raise RowError("'prompt' must end with the user (or tool) turn the model answers; GRPO samples the answers")
    return {"prompt": messages, **{k: v for k, v in row.items() if k != "prompt"}}


def _source_format(name: str, first: Any) -> str:
    if not is_prompt_row(first):
        keys = ", ".join(repr(k) for k in first) if isinstance(first, dict) else type(first).__name__
        raise DataError(f"{name}: training.objective grpo needs prompts, got a row with keys {keys}: give "
                        "{'prompt': ..., <columns the rewards read>} or GSM8K's {'question', 'answer'}; SFT or "
                        "preference data goes with training.objective sft / dpo / kto")
    return PROMPT if "prompt" in first else GSM8K


def _read(sources, seed: int, split: str) -> tuple[list[dict], list[tuple[str, str, int]]]:
    rows, described = [], []
    for index, source in enumerate(sources):
        name, raw = source_rows(source)
        fmt = _source_format(name, raw[0][0])
        parsed = parse_rows(name, raw, fmt, parse_prompt_row, detected=True, expected=lambda f: "'prompt'")
        rows += apply_weight(parsed, source.weight, seed, key=f"{split}:{index}:{name}")
        described.append((name, fmt, len(raw)))
    return rows, described


def prepare_prompts(data_cfg, tokenizer, seed: int, max_completion_length: int) -> PreparedPrompts:
    """Read, render and measure every prompt; drop (and count) those that leave no room to answer."""
    if not data_cfg.train:
        raise DataError("data.train: no prompts; set it to a file of {'prompt': ...} rows")
    train, described = _read(data_cfg.train, seed, "train")
    evaluation, _ = _read(data_cfg.eval, seed, "eval")
    if not data_cfg.eval and data_cfg.eval_fraction > 0:
        random.Random(f"{seed}:eval").shuffle(train)
        cut = max(1, round(data_cfg.eval_fraction * len(train)))
        train, evaluation = train[cut:], train[:cut]
    budget = data_cfg.max_length - max_completion_length
    kept, ids, dropped = [], [], {}
    for row in train:
        messages = with_system_prompt(row["prompt"], data_cfg.system_prompt)
        text = render(tokenizer, messages, row.get("tools"), "prompt", add_generation_prompt=True)
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(tokens) > budget:
            dropped[DROP_PROMPT_TOO_LONG] = dropped.get(DROP_PROMPT_TOO_LONG, 0) + 1
            continue
        kept.append({**row, "prompt": messages})
        ids.append(tokens)
    if not kept:
        raise DataError(f"data.train: no prompt fits: every one leaves fewer than training.max_completion_length "
                        f"({max_completion_length}) of data.max_length ({data_cfg.max_length}) tokens; raise max_length")
    columns = sorted({k for row in kept for k in row if k != "prompt"})
    summary = PromptSummary(described, len(kept), dropped, columns, [len(t) for t in ids], data_cfg.max_length,
                            max_completion_length, len(evaluation))
    evaluation = [{**row, "prompt": with_system_prompt(row["prompt"], data_cfg.system_prompt)} for row in evaluation]
    return PreparedPrompts(kept, evaluation, summary, ids)

