"""Data sources and formats: every format parses to the same conversation; bad input names file:line/row."""

import json
from pathlib import Path

import pytest

from h1tune.config import DataSourceConfig
from h1tune.data import load_conversations
from h1tune.data.sources import apply_weight, read_source
from h1tune.errors import DataError

FIXTURES = Path(__file__).parents[1] / "fixtures" / "data"


def load(path, **kw):
    return load_conversations([DataSourceConfig(path=str(path), **kw)], seed=0)


def structure(convs):
    """What must agree across formats: messages and tools, not where they came from."""
    return [(c.messages, c.tools) for c in convs]


@pytest.fixture(scope="module")
def expected():
    return structure(load(FIXTURES / "messages.jsonl"))


@pytest.mark.parametrize("name, fmt", [
    ("sharegpt.json", "sharegpt"), ("alpaca.json", "alpaca"), ("alpaca.csv", "alpaca"),
    ("prompt_completion.jsonl", "prompt_completion"),
])
def test_every_format_parses_to_the_same_conversations(name, fmt, expected):
    convs = load(FIXTURES / name)
    assert [c.format for c in convs] == [fmt, fmt]
    assert structure(convs) == expected
    assert expected[0][0][0] == {"role": "system", "content": "You are a concise assistant."}
    assert expected[1][0][0]["content"] == "Translate to French:\nGood morning, friends."  # alpaca instruction + input


def test_parquet_and_json_lines_misnamed_json(tmp_path, expected):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIXTURES / "messages.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    assert structure(load(tmp_path / "chat.parquet")) == expected
    misnamed = tmp_path / "chat.json"
    misnamed.write_text((FIXTURES / "messages.jsonl").read_text())
    convs = load(misnamed)
    assert structure(convs) == expected and convs[1].where.endswith("chat.json:2")


def test_explicit_format_overrides_detection(tmp_path):
    path = tmp_path / "both.jsonl"  # has `text` and alpaca keys: auto picks alpaca
    path.write_text(json.dumps({"instruction": "Hi", "output": "Hello", "text": "raw"}) + "\n")
    assert load(path)[0].format == "alpaca"
    text = load(path, format="text")[0]
    assert text.format == "text" and text.text == "raw" and not text.is_chat


def test_sharegpt_tool_calls_match_messages_with_tools():
    msgs = load(FIXTURES / "tools_messages.jsonl")[0]
    share = load(FIXTURES / "tools_sharegpt.json")[0]
    assert structure([share]) == structure([msgs])
    assert [m["role"] for m in share.messages] == [
        "user", "assistant", "tool", "assistant", "user", "assistant", "tool", "tool", "assistant"]
    first = share.messages[1]
    assert first["content"] == "" and first["tool_calls"] == [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    # a gpt turn followed by function_call is one assistant turn with parallel calls; string arguments decoded
    assert [c["function"]["arguments"] for c in share.messages[5]["tool_calls"]] == [{"city": "Rome"}, {"city": "Oslo"}]
    assert share.tools[0]["name"] == "get_weather"  # the JSON-string `tools` column is decoded


def test_weights_repeat_and_subsample_deterministically(tmp_path):
    items = list(range(10))
    assert apply_weight(items, 2.0, seed=1, key="a") == items + items
    half = apply_weight(items, 0.5, seed=1, key="a")
    assert len(half) == 5 and half == sorted(set(half)) and half == apply_weight(items, 0.5, seed=1, key="a")
    assert half != apply_weight(items, 0.5, seed=2, key="a")
    one_and_half = apply_weight(items, 1.5, seed=1, key="a")
    assert one_and_half[:10] == items and len(one_and_half) == 15
    assert len(apply_weight(items, 0.04, seed=1, key="a")) == 0  # round(0.4) rows: documented
    path = FIXTURES / "messages.jsonl"
    mixed = load_conversations([DataSourceConfig(path=str(path), weight=3),
                                DataSourceConfig(path=str(FIXTURES / "alpaca.json"), weight=0.5)], seed=0)
    assert [c.format for c in mixed] == ["messages"] * 6 + ["alpaca"]


# --- bad input --------------------------------------------------------------------------------


def error_of(path, **kw) -> str:
    with pytest.raises(DataError) as info:
        load(path, **kw)
    return str(info.value)


def test_malformed_json_lines_name_every_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "broken"\n{"text": "ok"}\n{oops}\n')
    message = error_of(path)
    assert f"{path}:3: not valid JSON" in message and f"{path}:5: not valid JSON" in message
    assert "2 problems" in message


def test_malformed_json_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n')
    assert error_of(path).startswith(f"{path}:3:")


def test_row_missing_fields_names_row_format_and_keys(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "response": "d"}]))
    message = error_of(path)
    assert f"{path} row 2" in message and "alpaca row is missing 'output'" in message
    assert "'instruction', 'output'" in message and "found 'instruction', 'response'" in message
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text(json.dumps({"messages": []}) + "\n" + json.dumps({"conversations": []}) + "\n")
    assert f"{jsonl}:2: messages row is missing 'messages'" in error_of(jsonl)
    table = tmp_path / "rows.csv"
    table.write_text('instruction,output\nhi,"a quoted\ntwo-line cell"\nbye\n')  # row 2 starts on line 4
    assert f"{table}:4: alpaca row is missing 'output'" in error_of(table)


def test_unknown_roles_are_named_with_the_allowed_ones(tmp_path):
    path = tmp_path / "roles.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "bot", "content": "hi"}]}) + "\n")
    message = error_of(path)
    assert f"{path}:1" in message and "unknown role 'bot'" in message and "system, user, assistant, tool" in message
    share = tmp_path / "share.json"
    share.write_text(json.dumps([{"conversations": [{"from": "robot", "value": "hi"}]}]))
    message = error_of(share)
    assert "row 1" in message and "unknown role 'robot'" in message and "function_call" in message


def test_bad_function_call_and_undetectable_format(tmp_path):
    share = tmp_path / "calls.json"
    share.write_text(json.dumps([{"conversations": [{"from": "human", "value": "x"},
                                                    {"from": "function_call", "value": "get_weather(Paris)"}]}]))
    assert "conversations[1]: a function_call value must be a JSON string" in error_of(share)
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"query": "q", "response": "a"}) + "\n")
    message = error_of(odd)
    assert "cannot tell the data format" in message and "'query', 'response'" in message and "alpaca" in message
    gsm8k = tmp_path / "gsm8k.jsonl"  # prompts with a reference answer: GRPO's data, named as such
    gsm8k.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    assert "Set training.objective: grpo" in error_of(gsm8k)


def test_empty_and_missing_files_never_reach_the_hub(tmp_path, monkeypatch):
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError("a local-looking path must not be looked up on the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "no rows" in error_of(empty)
    for name in ("missing.json", "missing.jsonl", "data/missing.csv", "missing.parquet", "./train"):
        message = error_of(name)
        assert name in message and "no such file" in message
    assert "is a directory" in error_of(tmp_path)


def test_hub_ids_go_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake(path, split):
        calls.append((path, split))
        return [{"text": "hello"}]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    convs = load("someorg/some-dataset", split="train[:10]")
    assert calls == [("someorg/some-dataset", "train[:10]")] and convs[0].text == "hello"
    assert convs[0].where == "someorg/some-dataset row 1"


def test_read_source_reports_detected_format():
    data = read_source(DataSourceConfig(path=str(FIXTURES / "text.jsonl")))
    assert data.format == "text" and len(data.conversations) == 2
