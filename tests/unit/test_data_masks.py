"""Assistant-only labels: exactly the assistant turns (content, tool calls, <|im_end|>) are trained."""

import json
from pathlib import Path

import pytest

from h1tune.config import DataConfig, DataSourceConfig
from h1tune.data import IGNORE_INDEX, load_conversations, pad_collate, tokenize_conversation
from h1tune.data.conversation import Conversation
from h1tune.data.render import encode_conversation
from h1tune.errors import DataError
from h1tune.presets import IM_END

FIXTURES = Path(__file__).parents[1] / "fixtures" / "data"


def load(name, **kw):
    return load_conversations([DataSourceConfig(path=str(FIXTURES / name), **kw)], seed=0)


def trained_segments(tokenizer, example) -> list[str]:
    """Decode each run of labelled tokens; labels must equal the input ids where they are set."""
    segments, run = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            segments.append(tokenizer.decode(run))
            run = []
    if run:
        segments.append(tokenizer.decode(run))
    return segments


def expected_assistant_text(message) -> str:
    """What our ChatML template writes for an assistant turn, minus its header."""
    parts = [message["content"]] if message["content"] else []
    for call in message.get("tool_calls", []):
        fn = call["function"]
        parts.append("<tool_call>\n" + json.dumps({"name": fn["name"], "arguments": fn["arguments"]}) + "\n</tool_call>")
    return "\n".join(parts) + IM_END


@pytest.mark.parametrize("name", ["messages.jsonl", "sharegpt.json", "alpaca.json", "prompt_completion.jsonl",
                                  "tools_messages.jsonl", "tools_sharegpt.json"])
def test_labels_are_exactly_the_assistant_turns(tiny_tokenizer, name):
    for conv in load(name):
        example = tokenize_conversation(conv, tiny_tokenizer, DataConfig())
        assistants = [m for m in conv.messages if m["role"] == "assistant"]
        assert trained_segments(tiny_tokenizer, example) == [expected_assistant_text(m) for m in assistants]
        # and the whole example is what apply_chat_template(tokenize=True) gives
        rendered = tiny_tokenizer.apply_chat_template(conv.messages, tools=conv.tools, tokenize=False)
        assert example["input_ids"] == tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_tool_call_turns_train_the_call_and_not_the_tool_result(tiny_tokenizer):
    conv = load("tools_sharegpt.json")[0]
    segments = trained_segments(tiny_tokenizer, tokenize_conversation(conv, tiny_tokenizer, DataConfig()))
    assert segments[0] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    assert segments[2].startswith("Checking both cities.\n<tool_call>") and segments[2].count("<tool_call>") == 2
    joined = "".join(segments)
    assert "temperature" not in joined and "<tools>" not in joined and "assistant\n" not in joined


def test_system_prompt_is_added_only_where_missing(tiny_tokenizer):
    cfg = DataConfig(system_prompt="Answer in French.")
    with_system, without = load("messages.jsonl")
    decoded = tiny_tokenizer.decode(tokenize_conversation(without, tiny_tokenizer, cfg)["input_ids"])
    assert decoded.startswith("<|begin_of_text|><|im_start|>system\nAnswer in French.<|im_end|>")
    decoded = tiny_tokenizer.decode(tokenize_conversation(with_system, tiny_tokenizer, cfg)["input_ids"])
    assert "Answer in French." not in decoded and without.messages[0]["role"] == "user"  # input not mutated


def test_all_token_loss_and_text_format(tiny_tokenizer):
    conv = load("messages.jsonl")[0]
    example = tokenize_conversation(conv, tiny_tokenizer, DataConfig(assistant_only_loss=False))
    assert example["labels"] == example["input_ids"]
    doc = load("text.jsonl")[0]
    example = tokenize_conversation(doc, tiny_tokenizer, DataConfig())
    ids = example["input_ids"]
    assert ids[0] == tiny_tokenizer.bos_token_id and ids[-1] == tiny_tokenizer.eos_token_id
    assert example["labels"] == ids and tiny_tokenizer.decode(ids[1:-1]) == doc.text


def test_works_with_another_chatml_template(tiny_tokenizer):
    """A template written differently (no bos, tools ignored, fails on an empty chat) still masks right."""
    other = _copy(tiny_tokenizer)
    other.chat_template = (
        "{%- if messages[0].role == 'system' %}{{ '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}{% endif %}"
        "{%- for m in messages %}{%- if m.role != 'system' %}"
        "{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>' + '\n' }}{%- endif %}{% endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    conv = load("messages.jsonl")[0]
    segments = trained_segments(other, tokenize_conversation(conv, other, DataConfig()))
    assert segments == [m["content"] + IM_END for m in conv.messages if m["role"] == "assistant"]
    opening = Conversation(messages=[{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Hi"}])
    assert trained_segments(other, tokenize_conversation(opening, other, DataConfig())) == ["Hello." + IM_END]


def test_template_that_is_not_prefix_stable_is_refused(tiny_tokenizer):
    other = _copy(tiny_tokenizer)
    # renders every assistant turn but the last without content: earlier turns change as the chat grows
    other.chat_template = (
        "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\n' }}"
        "{%- if m.role != 'assistant' or loop.last %}{{ m.content }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    )
    with pytest.raises(DataError, match="not prefix-stable.*data.assistant_only_loss: false") as info:
        tokenize_conversation(load("messages.jsonl")[0], other, DataConfig())
    assert "messages.jsonl:1" in str(info.value)
    other.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        tokenize_conversation(load("messages.jsonl")[0], other, DataConfig())


def _copy(tokenizer):
    import copy

    return copy.deepcopy(tokenizer)


def long_chat(turns: int) -> Conversation:
    """A user prompt longer than the assistant answers, so truncation can cut all answers."""
    messages = [{"role": "user", "content": "tell me about packing " * 40}]
    for i in range(turns):
        messages += [{"role": "assistant", "content": f"answer {i} about packing"}, {"role": "user", "content": "more"}]
    return Conversation(messages=messages[:-1], source="long.jsonl", row=1)


def test_truncate_keeps_a_prefix_and_drop_mode_drops(tiny_tokenizer):
    conv = long_chat(3)
    full = encode_conversation(conv, tiny_tokenizer, DataConfig())
    limit = full.length - 5
    cut = tokenize_conversation(conv, tiny_tokenizer, DataConfig(max_length=limit))
    assert cut.truncated and cut.original_length == full.length and cut.length == limit
    assert cut["input_ids"] == full.input_ids[:limit] and cut["labels"] == full.labels[:limit]
    assert tokenize_conversation(conv, tiny_tokenizer, DataConfig(max_length=limit, truncation="drop")) is None
    # the prompt alone is longer than the limit: nothing left to train, so the row is dropped
    first_label = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    assert tokenize_conversation(conv, tiny_tokenizer, DataConfig(max_length=first_label)) is None
    kept = tokenize_conversation(conv, tiny_tokenizer, DataConfig(max_length=first_label + 1))
    assert kept.truncated and kept.trainable == 1


def test_pad_collate_pads_right_and_ignores_padding():
    batch = pad_collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}],
                        pad_token_id=0, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
