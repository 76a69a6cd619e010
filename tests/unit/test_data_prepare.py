"""prepare_datasets: train/eval splits, truncation accounting, the summary, and the real demo files."""

import json
from pathlib import Path

import pytest

from h1tune.config import DataConfig
from h1tune.data import IGNORE_INDEX, prepare_datasets, validate_data
from h1tune.errors import DataError

FIXTURES = Path(__file__).parents[1] / "fixtures" / "data"
REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real"  # ../shared beside the checkout
REAL = REAL if REAL.is_dir() else None
needs_real = pytest.mark.skipif(REAL is None, reason="shared/data/real (LLaMA-Factory demo data) is not next to the repo")


def fixture(name):
    return str(FIXTURES / name)


def write_chats(path: Path, n: int, answer_words: int = 3) -> str:
    with path.open("w") as handle:
        for i in range(n):
            answer = " ".join(["packing"] * answer_words)
            handle.write(json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                                  {"role": "assistant", "content": f"{answer} {i}"}]}) + "\n")
    return str(path)


def test_eval_fraction_holds_out_rows_deterministically_and_before_weighting(tiny_tokenizer, tmp_path):
    path = write_chats(tmp_path / "chats.jsonl", 20)
    cfg = DataConfig(train=[{"path": path, "weight": 2}], eval_fraction=0.25)
    first = prepare_datasets(cfg, tiny_tokenizer, seed=3)
    again = prepare_datasets(cfg, tiny_tokenizer, seed=3)
    other = prepare_datasets(cfg, tiny_tokenizer, seed=4)
    assert len(first.eval) == 5 and len(first.train) == 30  # 15 train rows, each twice
    assert first.eval == again.eval and first.train == again.train and first.eval != other.eval
    train_ids = {tuple(e["input_ids"]) for e in first.train}
    assert not any(tuple(e["input_ids"]) in train_ids for e in first.eval)
    assert first.summary.eval_held_out == 5 and first.summary.eval.examples == 5


def test_eval_sources_take_precedence_over_eval_fraction(tiny_tokenizer):
    cfg = DataConfig(train=[fixture("messages.jsonl")], eval=[fixture("alpaca.json")], eval_fraction=0.5)
    prepared = prepare_datasets(cfg, tiny_tokenizer, seed=0)
    assert len(prepared.train) == 2 and len(prepared.eval) == 2
    assert dict(prepared.summary.eval.formats) == {"alpaca": 2}
    assert all(set(e) == {"input_ids", "labels"} and isinstance(e["input_ids"], list) for e in prepared.train)


def test_truncate_and_drop_are_counted(tiny_tokenizer, tmp_path):
    short = write_chats(tmp_path / "short.jsonl", 4, answer_words=2)
    long = write_chats(tmp_path / "long.jsonl", 3, answer_words=80)
    lengths = [len(e["input_ids"]) for e in prepare_datasets(DataConfig(train=[short, long]), tiny_tokenizer, 0).train]
    limit = max(lengths[:4]) + 5  # every short row fits, every long one does not
    assert all(n > limit for n in lengths[4:])

    truncated = prepare_datasets(DataConfig(train=[short, long], max_length=limit), tiny_tokenizer, 0)
    assert truncated.summary.train.truncated == 3 and len(truncated.train) == 7
    assert max(len(e["input_ids"]) for e in truncated.train) == limit
    dropped = prepare_datasets(DataConfig(train=[short, long], max_length=limit, truncation="drop"), tiny_tokenizer, 0)
    assert len(dropped.train) == 4 and dict(dropped.summary.train.dropped) == {"longer than max_length (truncation: drop)": 3}
    text = dropped.summary.format()
    assert "longer than max_length (truncation: drop)" in text and "dropped" in text


def test_rows_whose_answers_are_truncated_away_are_dropped_and_counted(tiny_tokenizer, tmp_path):
    path = tmp_path / "long_prompt.jsonl"
    rows = [{"messages": [{"role": "user", "content": "why " * 200}, {"role": "assistant", "content": "because"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "no answer here"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepared = prepare_datasets(DataConfig(train=[str(path)], max_length=64), tiny_tokenizer, 0)
    assert len(prepared.train) == 1
    assert dict(prepared.summary.train.dropped) == {"assistant tokens all truncated away": 1,
                                                    "no assistant turn to train on": 1}
    with pytest.raises(DataError, match="no training examples left .*max_length"):
        prepare_datasets(DataConfig(train=[str(path)], max_length=8), tiny_tokenizer, 0)


def test_summary_counts_tokens_and_prints_a_table(tiny_tokenizer):
    cfg = DataConfig(train=[fixture("messages.jsonl"), fixture("text.jsonl")], max_length=512)
    prepared = prepare_datasets(cfg, tiny_tokenizer, seed=0)
    summary = prepared.summary
    assert summary.rows == 4 and dict(summary.train.formats) == {"messages": 2, "text": 2}
    assert summary.train.tokens == sum(len(e["input_ids"]) for e in prepared.train)
    assert summary.train.trainable_tokens == sum(l != IGNORE_INDEX for e in prepared.train for l in e["labels"])
    assert summary.train.tokens > summary.train.trainable_tokens > 0 and summary.eval is None
    text = summary.format()
    for expected in ("messages.jsonl  [messages]  2 rows", "trainable tokens", "truncated to 512", "#"):
        assert expected in text, text


def test_no_train_sources_is_a_clear_error(tiny_tokenizer):
    with pytest.raises(DataError, match="data.train: no training data"):
        validate_data(DataConfig(), tiny_tokenizer)
    with pytest.raises(DataError, match="eval_fraction: 0.9 of 2 rows leaves nothing to train on"):
        validate_data(DataConfig(train=[fixture("messages.jsonl")], eval_fraction=0.9), tiny_tokenizer)


def _assistant_text(message) -> str:
    parts = [message["content"]] if message["content"] else []
    for call in message.get("tool_calls", []):
        fn = call["function"]
        payload = json.dumps({"name": fn["name"], "arguments": fn["arguments"]}, ensure_ascii=False)
        parts.append(f"<tool_call>\n{payload}\n</tool_call>")
    return "\n".join(parts) + "<|im_end|>"


@needs_real
def test_real_glaive_toolcall_file_loads_masks_and_summarises(tiny_tokenizer):
    from h1tune.data import load_conversations, tokenize_conversation
    from h1tune.config import DataSourceConfig

    path = str(REAL / "glaive_toolcall_en_demo.json")
    convs = load_conversations([DataSourceConfig(path=path)], seed=0)
    assert len(convs) == 300 and all(c.format == "sharegpt" for c in convs)
    assert sum(c.tools is not None for c in convs) == 191  # 109 rows have tools "[]": no tools block
    calls = sum(len(m.get("tool_calls", [])) for c in convs for m in c.messages)
    assert calls == 211 and sum(m["role"] == "tool" for c in convs for m in c.messages) == 211
    cfg = DataConfig(train=[path], max_length=100_000)
    for conv in convs[:40]:
        example = tokenize_conversation(conv, tiny_tokenizer, cfg)
        labelled = [t for t, l in zip(example["input_ids"], example["labels"]) if l != IGNORE_INDEX]
        expected = "".join(_assistant_text(m) for m in conv.messages if m["role"] == "assistant")
        assert tiny_tokenizer.decode(labelled) == expected, conv.where
    summary = validate_data(DataConfig(train=[path], max_length=2048), tiny_tokenizer)
    assert summary.rows == 300 and summary.train.examples + sum(summary.train.dropped.values()) == 300
    assert "sharegpt" in summary.format()


@needs_real
def test_real_alpaca_file_loads_and_summarises(tiny_tokenizer):
    summary = validate_data(DataConfig(train=[str(REAL / "alpaca_en_demo.json")], max_length=2048), tiny_tokenizer)
    assert summary.rows == 999 and dict(summary.train.formats) == {"alpaca": 999}
    assert summary.train.examples == 999 and 0 < summary.train.trainable_tokens < summary.train.tokens
    assert "alpaca_en_demo.json  [alpaca]  999 rows" in summary.format()


def test_keys_the_format_does_not_read_are_warned_with_counts(tmp_path, tiny_tokenizer, caplog):
    rows = [{"instruction": "Say hi", "output": "hi", "chosen": "hi", "id": i} for i in range(3)]
    rows[0].pop("chosen")
    (tmp_path / "extra.json").write_text(json.dumps(rows))
    with caplog.at_level("WARNING", logger="h1tune"):
        prepared = prepare_datasets(DataConfig(train=[str(tmp_path / "extra.json")], max_length=64), tiny_tokenizer, 0)
    assert "format 'alpaca' does not use 'id' (3 rows), 'chosen' (2 rows)" in caplog.text
    assert "ignored keys (not read by this format): 'id' in 3 rows, 'chosen' in 2 rows" in prepared.summary.format()


def test_long_text_documents_are_split_into_max_length_pieces(tmp_path, tiny_tokenizer):
    document = " ".join(f"word{i}" for i in range(400))
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": document}) + "\n")
    prepared = prepare_datasets(DataConfig(train=[str(tmp_path / "text.jsonl")], max_length=64), tiny_tokenizer, 0)
    whole = tiny_tokenizer(document, add_special_tokens=False)["input_ids"]
    pieces = [e["input_ids"] for e in prepared.train]
    assert len(pieces) > 2 and all(len(p) <= 64 for p in pieces)
    joined = [t for p in pieces for t in p]
    assert joined[1:1 + len(whole)] == whole  # every token kept, in order (after BOS)
    text = prepared.summary.format()
    assert "documents" in text and "trainable tokens (all tokens)" in text and "extra pieces" in text
    assert prepared.summary.train.truncated == 0


def test_invalid_json_line_reads_cleanly(tmp_path):
    from h1tune.data.sources import read_rows

    (tmp_path / "bad.jsonl").write_text('{"text": "unterminated}\n')
    with pytest.raises(DataError) as err:
        read_rows(tmp_path / "bad.jsonl")
    assert "bad.jsonl:1: not valid JSON (Unterminated string starting at, column" in str(err.value)
    assert "at at" not in str(err.value)
