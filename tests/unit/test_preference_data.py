"""Preference data: every paired / unpaired format parses to the same structure, completions are
exactly the chosen/rejected texts, bad rows name file:line, and drops are counted with a warning."""

import json
import logging
from pathlib import Path

import pytest

from h1tune.config import DataConfig, DataSourceConfig
from h1tune.data.preference import PreferencePair, UnpairedExample, sft_refusal
from h1tune.data.preference_prepare import prepare_preference_data, read_preference_source
from h1tune.data.preference_tokens import DROP_COMPLETION_CUT, DROP_SAME, encode_pair
from h1tune.errors import DataError

FIXTURES = Path(__file__).parents[1] / "fixtures" / "data"
REAL = Path("/work/shared/data/real")


def examples(path, objective="dpo", **kw):
    return read_preference_source(DataSourceConfig(path=str(path), **kw), objective).conversations


def pair_structure(pairs):
    return [(p.prompt, p.chosen, p.rejected, p.tools) for p in pairs]


def unpaired_structure(items):
    return [(u.prompt, u.completion, u.label, u.tools) for u in items]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def data_cfg(path, **kw):
    return DataConfig(train=[{"path": str(path)}], **kw)


@pytest.mark.parametrize("name, fmt", [
    ("preference_sharegpt_ranking.json", "sharegpt_ranking"),
    ("preference_trl.jsonl", "preference"),
    ("preference_trl_implicit.jsonl", "preference"),
])
def test_paired_formats_parse_to_the_same_pairs(name, fmt):
    pairs = examples(FIXTURES / name)
    assert all(isinstance(p, PreferencePair) and p.format == fmt for p in pairs)
    assert pair_structure(pairs) == pair_structure(examples(FIXTURES / "preference_trl.jsonl"))
    first = pairs[0]
    assert [m["role"] for m in first.prompt] == ["system", "user", "assistant", "user"]
    assert first.chosen == {"role": "assistant", "content": "The Technology Innovation Institute, in May 2025."}
    assert first.rejected == {"role": "assistant", "content": "I do not know who released it."}


@pytest.mark.parametrize("name", ["kto_messages.jsonl", "kto_sharegpt.json", "kto_prompt_completion.jsonl"])
def test_unpaired_formats_parse_to_the_same_examples_and_match_unpaired_pairs(name):
    items = examples(FIXTURES / name, objective="kto")
    assert all(isinstance(u, UnpairedExample) for u in items)
    assert [u.label for u in items] == [True, True, False, False]
    unpaired = [u for p in examples(FIXTURES / "preference_trl.jsonl") for u in p.unpaired()]
    # the fixtures list every chosen first, then every rejected; compare as sets of structures
    as_key = lambda s: json.dumps(s, sort_keys=True)  # noqa: E731
    assert sorted(map(as_key, unpaired_structure(items))) == sorted(map(as_key, unpaired_structure(unpaired)))


def test_plain_string_prompt_and_completions(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}])
    pair = examples(path)[0]
    assert pair.prompt == [{"role": "user", "content": "Hi"}]
    assert (pair.chosen["content"], pair.rejected["content"]) == ("Hello!", "Go away.")


def test_bad_rows_name_file_line_and_field():
    with pytest.raises(DataError) as err:
        examples(FIXTURES / "preference_bad.jsonl")
    text = str(err.value)
    assert "4 problems" in text and "preference_bad.jsonl:1" not in text
    assert "preference_bad.jsonl:2: 'chosen' must be one assistant message" in text
    assert "preference_bad.jsonl:3: prompt[0]: unknown role 'robot'" in text
    assert "preference_bad.jsonl:4: preference row is missing 'rejected'" in text
    assert "preference_bad.jsonl:5: 'prompt' ends with an assistant turn" in text


def test_sharegpt_ranking_bad_turn_names_the_row(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "Yo"},
             "rejected": {"from": "robot", "value": "No"}}]
    path = tmp_path / "rank.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"rank.json row 1: rejected: unknown role 'robot'"):
        examples(path)


def test_objective_and_data_must_agree(tmp_path):
    with pytest.raises(DataError, match="unpaired \\(KTO\\) data.*Set training.objective: kto"):
        examples(FIXTURES / "kto_messages.jsonl", objective="dpo")
    with pytest.raises(DataError, match="SFT data \\(format 'messages'\\): set training.objective: sft"):
        examples(FIXTURES / "messages.jsonl", objective="dpo")
    assert "training.objective: dpo" in sft_refusal("d.json", json.loads((REAL / "dpo_en_demo.json").read_text())[0])
    assert "training.objective: kto" in sft_refusal("k.json", json.loads((REAL / "kto_en_demo.json").read_text())[0])
    assert sft_refusal("m.jsonl", {"messages": [], "label": "spam"}) is None  # a non-boolean label is not KTO
    assert sft_refusal("m.jsonl", {"messages": []}) is None


def test_completion_tokens_decode_to_the_chosen_and_rejected_texts(tiny_tokenizer):
    cfg = DataConfig()
    for pair in examples(FIXTURES / "preference_sharegpt_ranking.json"):
        ex = encode_pair(pair, tiny_tokenizer, cfg)
        end = tiny_tokenizer.eos_token  # <|im_end|> closes the assistant turn and is scored
        assert tiny_tokenizer.decode(ex["chosen_ids"]) == pair.chosen["content"] + end
        assert tiny_tokenizer.decode(ex["rejected_ids"]) == pair.rejected["content"] + end
        prompt = tiny_tokenizer.apply_chat_template(pair.prompt, tokenize=False, add_generation_prompt=True)
        assert tiny_tokenizer.decode(ex["prompt_ids"]) == prompt


def test_prepare_counts_and_warns_about_dropped_pairs(tmp_path, tiny_tokenizer, caplog):
    rows = [
        {"prompt": "Say hi.", "chosen": "Hello there, friend.", "rejected": "No."},
        {"prompt": "Say hi.", "chosen": "Same answer.", "rejected": "Same answer."},
        {"prompt": "word " * 200, "chosen": "Hello.", "rejected": "No."},  # prompt alone fills max_length
        {"prompt": "Count.", "chosen": "one two three four " * 20, "rejected": "one two three four " * 20 + "five"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="h1tune"):
        prepared = prepare_preference_data(data_cfg(path, max_length=64), tiny_tokenizer, seed=0, objective="dpo")
    summary = prepared.summary
    assert summary.train.examples == len(prepared.train) == 1
    # the last pair differs only past max_length, so truncation makes chosen equal rejected
    assert summary.train.dropped == {DROP_SAME: 2, DROP_COMPLETION_CUT: 1}
    assert "dropped 3 pairs: 2 chosen equals rejected, 1 completion truncated away" in caplog.text
    assert all(len(e["prompt_ids"]) + len(e["chosen_ids"]) <= 64 for e in prepared.train)
    table = summary.format()
    assert "pairs kept" in table and "chosen equals rejected" in table and "[preference]" in table


def test_truncation_drop_and_truncate(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "Long answer please.", "chosen": "yes " * 100, "rejected": "no " * 100}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    cut = prepare_preference_data(data_cfg(path, max_length=48), tiny_tokenizer, 0, "dpo")
    example = cut.train[0]
    assert cut.summary.train.truncated == 1
    assert len(example["prompt_ids"]) + len(example["chosen_ids"]) == 48
    with pytest.raises(DataError, match="no dpo examples left .*longer than max_length"):
        prepare_preference_data(data_cfg(path, max_length=48, truncation="drop"), tiny_tokenizer, 0, "dpo")


def test_kto_unpairs_pairs_and_keeps_labels(tiny_tokenizer):
    prepared = prepare_preference_data(data_cfg(FIXTURES / "preference_trl.jsonl"), tiny_tokenizer, 0, "kto")
    assert [e["label"] for e in prepared.train] == [True, False, True, False]
    direct = prepare_preference_data(data_cfg(FIXTURES / "kto_messages.jsonl"), tiny_tokenizer, 0, "kto")
    key = lambda e: (e["prompt_ids"], e["completion_ids"], e["label"])  # noqa: E731
    assert sorted(map(key, prepared.train)) == sorted(map(key, direct.train))
    assert prepared.summary.train.desirable == 2 and "desirable" in prepared.summary.format()


def test_real_demo_files(tiny_tokenizer):
    dpo = prepare_preference_data(data_cfg(REAL / "dpo_en_demo.json", max_length=32768), tiny_tokenizer, 0, "dpo")
    assert dpo.summary.sources[0].format == "sharegpt_ranking" and dpo.summary.sources[0].rows == 300
    assert dpo.summary.train.examples == 300 and not dpo.summary.train.dropped
    kto = prepare_preference_data(data_cfg(REAL / "kto_en_demo.json", max_length=32768), tiny_tokenizer, 0, "kto")
    assert kto.summary.sources[0].format == "kto_messages"
    assert kto.summary.train.desirable == 150 and kto.summary.train.examples == 300
