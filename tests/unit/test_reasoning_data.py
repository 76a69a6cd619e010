"""Reasoning traces (issue 22): every data convention reads to the same conversation, the three
`data.reasoning` modes give the masks they promise (decoded per chat format), a template that leaves
earlier traces out is followed, and an answer cut by max_length is counted."""

from __future__ import annotations

import json
import re

import pytest

from h1tune.config import DataConfig
from h1tune.data import prepare_datasets
from h1tune.data.formats import RowError, parse_row
from h1tune.data.render import mark_trained_tokens
from h1tune.presets import build_tokenizer

TRACE, ANSWER = "Two plus two: count on from two, three, four.", "It is 4."
QUESTION = "What is 2+2?"
CONVENTIONS = {
    "reasoning_content": ({"messages": [{"role": "user", "content": QUESTION},
                                        {"role": "assistant", "content": ANSWER, "reasoning_content": TRACE}]},
                          "messages"),
    "think inline": ({"messages": [{"role": "user", "content": QUESTION},
                                   {"role": "assistant", "content": f"<think>\n{TRACE}\n</think>\n\n{ANSWER}"}]},
                     "messages"),
    "opened by the template": ({"messages": [{"role": "user", "content": QUESTION},
                                             {"role": "assistant", "content": f"{TRACE}</think>{ANSWER}"}]}, "messages"),
    "typed parts": ({"messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION}]},
                                  {"role": "assistant", "content": [{"type": "reasoning", "text": TRACE},
                                                                    {"type": "text", "text": ANSWER}]}]}, "messages"),
    "thinking part": ({"messages": [{"role": "user", "content": QUESTION},
                                    {"role": "assistant", "content": [{"type": "thinking", "thinking": TRACE},
                                                                      {"type": "text", "text": ANSWER}]}]}, "messages"),
    "sharegpt": ({"conversations": [{"from": "human", "value": QUESTION},
                                    {"from": "gpt", "value": ANSWER, "reasoning": TRACE}]}, "sharegpt"),
    "alpaca": ({"instruction": QUESTION, "output": ANSWER, "thinking": TRACE}, "alpaca"),
    "prompt_completion": ({"prompt": QUESTION, "completion": f"<think>{TRACE}</think>{ANSWER}"}, "prompt_completion"),
}
EXPECTED = [{"role": "user", "content": QUESTION},
            {"role": "assistant", "content": ANSWER, "reasoning_content": TRACE}]


@pytest.mark.parametrize("name", CONVENTIONS)
def test_every_convention_reads_to_the_same_conversation(name):
    row, fmt = CONVENTIONS[name]
    messages, _, _ = parse_row(row, fmt)
    assert messages == EXPECTED


def test_bad_reasoning_forms_name_the_field():
    with pytest.raises(RowError, match=r"messages\[1\].content\[0\]: only text and reasoning parts"):
        parse_row({"messages": [{"role": "user", "content": "x"},
                                {"role": "assistant", "content": [{"type": "image_url", "image_url": "a.png"}]}]},
                  "messages")
    with pytest.raises(RowError, match="only assistant turns carry reasoning"):
        parse_row({"messages": [{"role": "user", "content": [{"type": "reasoning", "text": "x"}]}]}, "messages")
    with pytest.raises(RowError, match="both 'reasoning_content' and 'thinking'"):
        parse_row({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y",
                                                                   "reasoning_content": "a", "thinking": "b"}]},
                  "messages")


def trained_runs(tokenizer, example: dict) -> list[str]:
    return re.findall(r"\[\[(.*?)\]\]", mark_trained_tokens(tokenizer, example["input_ids"], example["labels"]), re.S)


def prepare(tmp_path, rows: list[dict], chat_format: str = "h1", **data):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = build_tokenizer(chat_format)
    cfg = DataConfig(train=[{"path": str(path)}], max_length=data.pop("max_length", 512), **data)
    return tokenizer, prepare_datasets(cfg, tokenizer, seed=0)


@pytest.mark.parametrize("chat_format", ["h1", "h1r", "h1tiny"])
@pytest.mark.parametrize("mode", ["train", "mask", "drop"])
def test_reasoning_modes_decode_to_the_promised_tokens(tmp_path, chat_format, mode):
    tokenizer, data = prepare(tmp_path, [{"messages": EXPECTED}], chat_format, reasoning=mode)
    example = data.train[0]
    text = tokenizer.decode(example["input_ids"])
    end = "<|im_end|>"  # (Tiny's format without tools is plain ChatML)
    trained = "".join(trained_runs(tokenizer, example))
    if mode == "train":
        assert trained == f"<think>\n{TRACE}\n</think>\n\n{ANSWER}{end}"
    elif mode == "mask":
        assert trained == f"{ANSWER}{end}" and TRACE in text
    else:
        assert trained == f"{ANSWER}{end}" and TRACE not in text and "<think>" not in text
    stats = data.summary.train
    assert stats.traces == 1 and stats.traces_rendered == (0 if mode == "drop" else 1)
    assert (stats.reasoning_tokens > 10) == (mode != "drop")
    summary = data.summary.format()
    assert "rows with reasoning traces 1" in summary and "reasoning traces (assistant turns)" in summary


def test_a_template_that_leaves_earlier_traces_out_is_followed(tmp_path):
    turns = [{"role": "user", "content": "First?"},
             {"role": "assistant", "content": "One.", "reasoning_content": "early trace"},
             {"role": "user", "content": "Second?"},
             {"role": "assistant", "content": "Two.", "reasoning_content": "late trace"}]
    tokenizer, data = prepare(tmp_path, [{"messages": turns}], "h1r")
    example = data.train[0]
    assert "early trace" not in tokenizer.decode(example["input_ids"])  # the template left it out
    assert trained_runs(tokenizer, example) == ["One.<|im_end|>", "<think>\nlate trace\n</think>\n\nTwo.<|im_end|>"]
    assert data.summary.train.traces == 2 and data.summary.train.traces_rendered == 1
    # the default format (h1 has no reasoning in its template) renders and trains every turn's trace
    tokenizer, data = prepare(tmp_path, [{"messages": turns}], "h1")
    runs = trained_runs(tokenizer, data.train[0])
    assert runs[0] == "<think>\nearly trace\n</think>\n\nOne.<|im_end|>" and "late trace" in runs[1]


def test_tiny_format_trains_the_json_list_tool_call(tmp_path):
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    row = {"messages": [{"role": "user", "content": "Weather in Oslo?"},
                        {"role": "assistant", "content": "", "tool_calls": [call]},
                        {"role": "tool", "content": "{\"temperature\": 3}"},
                        {"role": "assistant", "content": "It is 3 degrees."}],
           "tools": [{"name": "get_weather", "parameters": {"type": "object"}}]}
    tokenizer, data = prepare(tmp_path, [row], "h1tiny")
    runs = trained_runs(tokenizer, data.train[0])
    assert len(runs) == 2 and runs[1] == "It is 3 degrees.\n<|im_end|>"
    assert runs[0].startswith("<tool_call>\n[") and runs[0].endswith("]\n</tool_call>")
    assert json.loads(runs[0].removeprefix("<tool_call>").removesuffix("</tool_call>")) == [call]
    text = tokenizer.decode(data.train[0]["input_ids"])
    assert "<|im_start|>assistant\n<tool_response>" in text  # the result is an assistant turn, untrained
    assert "temperature" not in "".join(runs)


def test_an_answer_cut_by_max_length_is_counted_and_drop_leaves_it_out(tmp_path, caplog):
    long_trace = " ".join(f"step {i}" for i in range(120))
    rows = [{"messages": [{"role": "user", "content": QUESTION},
                          {"role": "assistant", "content": ANSWER, "reasoning_content": long_trace}]},
            {"messages": EXPECTED}]
    tokenizer, data = prepare(tmp_path, rows, max_length=128)
    assert data.summary.train.answer_cut == 1 and data.summary.train.truncated == 1
    assert "of which the last answer was cut" in data.summary.format()
    assert "lost the end of their last assistant answer" in caplog.text
    _, dropped = prepare(tmp_path, rows, max_length=128, truncation="drop")
    assert len(dropped.train) == 1 and sum(dropped.summary.train.dropped.values()) == 1
