"""Render a conversation with the tokenizer's own chat template and label the assistant tokens.

Falcon-H1's template has no `{% generation %}` markers, so TRL's `assistant_only_loss` cannot find
the assistant turns. We find them ourselves, for any template that renders earlier turns the same
way whatever follows (ChatML and most others):

1. render the whole conversation to text;
2. for each assistant message i, render messages[:i+1] (it must be a prefix of the whole text,
   else the template is not prefix-stable and we stop with an error) and messages[:i] with the
   generation prompt; the assistant's trained text runs from the end of that generation prompt
   (`<|im_start|>assistant\\n`) to the end of messages[:i+1] minus trailing whitespace, i.e. the
   content, any tool-call text, and the end-of-turn token (`<|im_end|>`);
3. tokenize the whole text once (exactly what `apply_chat_template(tokenize=True)` gives) and
   label every token whose character span overlaps a trained span, via the fast tokenizer's
   offset mapping.

Nothing here knows our template's strings, so the real Falcon-H1 tokenizer works the same way.
Labels are aligned with `input_ids` (the model shifts them); -100 is ignored by the loss.
"""

from __future__ import annotations

import os
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from typing import Any

from h1tune.data.conversation import Conversation
from h1tune.data.reasoning import messages_to_render, split_spans, template_reads_reasoning
from h1tune.errors import DataError

IGNORE_INDEX = -100

DROP_NO_ASSISTANT = "no assistant turn to train on"
DROP_TOO_LONG = "longer than max_length (truncation: drop)"
DROP_TRUNCATED_AWAY = "assistant tokens all truncated away"
DROP_EMPTY_ASSISTANT = "empty assistant turn (data.empty_assistant: drop)"


def has_empty_assistant(conv: Conversation) -> bool:
    """An assistant turn with neither text, a reasoning trace nor a tool call would train on the end-of-turn
    token alone."""
    return any(m["role"] == "assistant" and not m.get("content", "").strip() and not m.get("tool_calls")
               and not m.get("reasoning_content") for m in conv.messages)


@dataclass
class TokenizedExample:
    """One training example; `ex["input_ids"]` works as on a dict, `to_dict()` gives the plain dict."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    original_length: int | None = None  # before truncation
    reasoning: list[tuple[int, int]] = field(default_factory=list)  # token ranges of rendered reasoning traces
    answer_cut: bool = False  # truncation removed trained tokens of the last assistant turn

    @property
    def reasoning_tokens(self) -> int:
        return sum(max(0, min(b, self.length) - a) for a, b in self.reasoning)

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def trainable(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)

    def __getitem__(self, key: str) -> list[int]:
        if key not in ("input_ids", "labels"):
            raise KeyError(key)
        return getattr(self, key)

    def keys(self):
        return ("input_ids", "labels")

    def to_dict(self) -> dict[str, list[int]]:
        return {"input_ids": list(self.input_ids), "labels": list(self.labels)}


def with_system_prompt(messages: list[dict[str, Any]], system_prompt: str | None) -> list[dict[str, Any]]:
    """`messages` with `data.system_prompt` first when they have no system turn (SFT, preference and GRPO data)."""
    if system_prompt and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def chat_messages(conv: Conversation, system_prompt: str | None) -> list[dict[str, Any]]:
    """The conversation's messages, with `data.system_prompt` first when it has no system turn."""
    return with_system_prompt(conv.messages, system_prompt)


def check_chat_template(tokenizer, assistant_only_loss: bool = True) -> None:
    """Fail before any data is rendered when the tokenizer cannot render chats or give offsets."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template, so chat data cannot be rendered; use a "
                        "tokenizer with one (Falcon-H1 instruct tokenizers have it) or `format: text` data")
    if assistant_only_loss and not getattr(tokenizer, "is_fast", False):
        raise DataError("assistant-only labels need a fast tokenizer (character offsets); load it with "
                        "use_fast=True, or set data.assistant_only_loss: false")


_PROBE_CONVERSATION = [
    {"role": "system", "content": "s"},
    {"role": "user", "content": "u"},
    {"role": "assistant", "content": "a"},
]


def check_template_renders(tokenizer) -> None:
    """The template must render every turn's content, or assistant-only labels cannot be found."""
    check_chat_template(tokenizer, assistant_only_loss=False)
    try:
        text = tokenizer.apply_chat_template(_PROBE_CONVERSATION, tokenize=False)
    except Exception as exc:  # a broken Jinja template raises many kinds of errors
        raise DataError(f"the tokenizer's chat template fails to render a conversation: {exc}") from None
    if not all(turn["content"] in text for turn in _PROBE_CONVERSATION):
        raise DataError("the tokenizer's chat template drops some turns' content; use a Falcon-H1 Instruct "
                        "tokenizer or an h1tune preset")


def render(tokenizer, messages: list[dict[str, Any]], tools: list[Any] | None, where: str,
           add_generation_prompt: bool = False) -> str:
    """The template's text for `messages`; a template error names the conversation."""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja TemplateError, or a template's own raise_exception()
        raise DataError(f"{where}: the chat template could not render this conversation "
                        f"({type(exc).__name__}: {exc})") from None


def assistant_spans(tokenizer, messages: list[dict[str, Any]], tools: list[Any] | None,
                    where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of the assistant turns to train on."""
    full = render(tokenizer, messages, tools, where)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        upto = render(tokenizer, messages[: i + 1], tools, where)
        if not full.startswith(upto) and message.get("reasoning_content"):
            # a reasoning template leaves earlier turns' traces out: locate the turn as it is rendered
            bare = {k: v for k, v in message.items() if k != "reasoning_content"}
            upto = render(tokenizer, [*messages[:i], bare], tools, where)
        if not full.startswith(upto):
            raise DataError(
                f"{where}: the chat template is not prefix-stable: the first {i + 1} messages render differently "
                "inside the whole conversation, so the assistant turns cannot be located. Use a template that "
                "renders earlier turns independently of later ones (ChatML does), or set "
                "data.assistant_only_loss: false"
            )
        try:
            head = render(tokenizer, messages[:i], tools, where, add_generation_prompt=True)
            start = len(os.path.commonprefix([head, upto]))
        except DataError:
            if i:
                raise
            start = _opening_header_end(tokenizer, tools, upto, where)
        if spans:
            start = max(start, spans[-1][1])
        end = max(start, len(upto.rstrip()))
        spans.append((start, end))
    return full, spans


def _opening_header_end(tokenizer, tools: list[Any] | None, upto: str, where: str) -> int:
    """End of the assistant header when the chat opens with the assistant and the template cannot
    render an empty chat: learn the generation prompt from a one-message probe and find it."""
    probe = [{"role": "user", "content": "x"}]
    plain = render(tokenizer, probe, tools, where)
    prompted = render(tokenizer, probe, tools, where, add_generation_prompt=True)
    header = prompted[len(plain):] if prompted.startswith(plain) else ""
    found = upto.find(header) if header else -1
    return found + len(header) if found >= 0 else 0


def label_tokens(offsets: list[tuple[int, int]], spans: list[tuple[int, int]], input_ids: list[int]) -> list[int]:
    """Labels: the token id where the token's characters overlap a span, else IGNORE_INDEX.

    Token offsets are sorted, so each span covers a contiguous run of tokens found by bisection.
    """
    starts = [s for s, _ in offsets]
    ends = [max(e, s + 1) for s, e in offsets]  # zero-width tokens count at their position
    labels = [IGNORE_INDEX] * len(input_ids)
    for a, b in spans:
        first, stop = bisect_right(ends, a), bisect_left(starts, b)
        labels[first:stop] = input_ids[first:stop]
    return labels


def encode_conversation(conv: Conversation, tokenizer, data_cfg) -> TokenizedExample:
    """Token ids and labels of the whole conversation, before any truncation."""
    if not conv.is_chat:
        ids = tokenizer(conv.text, add_special_tokens=False)["input_ids"]
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        ids = ([bos] if bos is not None else []) + list(ids) + ([eos] if eos is not None else [])
        return TokenizedExample(input_ids=ids, labels=list(ids), original_length=len(ids))

    check_chat_template(tokenizer, data_cfg.assistant_only_loss)
    messages, traces = messages_to_render(chat_messages(conv, data_cfg.system_prompt), data_cfg.reasoning,
                                          template_reads_reasoning(tokenizer))
    if data_cfg.assistant_only_loss:
        text, spans = assistant_spans(tokenizer, messages, conv.tools, conv.where)
        spans, blocks = split_spans(text, spans, traces, mask=data_cfg.reasoning == "mask")
    else:
        text, spans, blocks = render(tokenizer, messages, conv.tools, conv.where), [], []
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=bool(spans or blocks))
    ids = list(encoding["input_ids"])
    if spans:
        labels = label_tokens(encoding["offset_mapping"], spans, ids)
    elif data_cfg.assistant_only_loss:
        labels = [IGNORE_INDEX] * len(ids)  # no assistant turn: dropped and counted by fit_to_length
    else:
        labels = list(ids)
    return TokenizedExample(input_ids=ids, labels=labels, original_length=len(ids),
                            reasoning=token_ranges(encoding["offset_mapping"], blocks) if blocks else [])


def token_ranges(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token index ranges overlapping each character span (as label_tokens labels them)."""
    starts = [s for s, _ in offsets]
    ends = [max(e, s + 1) for s, e in offsets]
    return [(bisect_right(ends, a), bisect_left(starts, b)) for a, b in spans]


def fit_to_length(example: TokenizedExample, max_length: int, truncation: str) -> tuple[TokenizedExample | None, str | None]:
    """Apply data.max_length: (example, None) to keep it, or (None, reason) when it is dropped."""
    if example.trainable == 0:
        return None, DROP_NO_ASSISTANT
    if example.length <= max_length:
        return example, None
    if truncation == "drop":
        return None, DROP_TOO_LONG
    cut = TokenizedExample(example.input_ids[:max_length], example.labels[:max_length],
                           truncated=True, original_length=example.length, reasoning=example.reasoning,
                           answer_cut=any(label != IGNORE_INDEX for label in example.labels[max_length:]))
    if cut.trainable == 0:
        return None, DROP_TRUNCATED_AWAY
    return cut, None


def split_document(example: TokenizedExample, max_length: int) -> list[TokenizedExample]:
    """A long plain-text document as consecutive pieces of max_length tokens (continued pre-training
    keeps every token; truncation would throw the rest of each document away)."""
    return [TokenizedExample(example.input_ids[i:i + max_length], example.labels[i:i + max_length],
                             original_length=min(max_length, example.length - i))
            for i in range(0, example.length, max_length) if example.length - i >= 2]  # 1 token predicts nothing


def tokenize_conversation(conv: Conversation, tokenizer, data_cfg) -> TokenizedExample | None:
    """Render, tokenize, label and fit one conversation; None when it is dropped (see fit_to_length)."""
    example, _ = fit_to_length(encode_conversation(conv, tokenizer, data_cfg),
                               data_cfg.max_length, data_cfg.truncation)
    return example


def mark_trained_tokens(tokenizer, input_ids: list[int], labels: list[int], open_mark: str = "[[",
                        close_mark: str = "]]") -> str:
    """The decoded example with every run of trained (labelled) tokens between markers, so a user sees
    exactly what the loss covers."""
    pieces, run, trained = [], [], None
    for token, label in zip(input_ids, labels):
        is_trained = label != IGNORE_INDEX
        if trained is not None and is_trained != trained:
            pieces.append((trained, run))
            run = []
        run.append(token)
        trained = is_trained
    if run:
        pieces.append((trained, run))
    text = ""
    for is_trained, tokens in pieces:
        decoded = tokenizer.decode(tokens, skip_special_tokens=False)
        text += f"{open_mark}{decoded}{close_mark}" if is_trained else decoded
    return text
