"""Reasoning traces in chat data: every convention users have, read into one field, then rendered.

Read from assistant messages (any data format that has them):

    {"role": "assistant", "content": "4", "reasoning_content": "2 + 2 ..."}   OpenAI-compatible / DeepSeek
                                                                              (also `reasoning`, `thinking`)
    {"role": "assistant", "content": "<think>2 + 2 ...</think>4"}            the trace inline
    {"role": "assistant", "content": [{"type": "reasoning", "text": "2 + 2 ..."}, {"type": "text", "text": "4"}]}

All become `reasoning_content` on the message: the key that chat templates which know reasoning read.
Rendering (`messages_to_render`): such a template renders the trace itself (and may leave it out of
earlier turns; the masks then follow what is rendered); for any other template the trace goes
before the answer as `<think>\\n…\\n</think>\\n\\n`, the form reasoning models (Falcon-H1R among them)
emit. `data.reasoning` decides what the loss sees: train (default: the trace is what a reasoning SFT
teaches), mask (rendered, not trained) or drop (not rendered).
"""

from __future__ import annotations

import re
from typing import Any

REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
REASONING_PART_TYPES = ("reasoning", "thinking")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_BLOCK_END = re.compile(r"\s*</think>\s*")


class ReasoningError(ValueError):
    """A malformed trace or content part; the row parser adds the file and row."""


def split_think(content: str) -> tuple[str | None, str]:
    """`<think>trace</think>answer` -> (trace, answer). A content that starts inside the trace
    (`trace</think>answer`, when the template opened `<think>` in the generation prompt) splits too."""
    if THINK_CLOSE not in content:
        return None, content
    head, _, answer = content.partition(THINK_CLOSE)
    before, opened, trace = head.partition(THINK_OPEN)
    if opened and before.strip():  # text before <think>: not a leading trace, keep the content as written
        return None, content
    return (trace if opened else head).strip("\n"), answer.lstrip("\n")


def content_parts(value: list[Any], where: str) -> tuple[str, str | None]:
    """OpenAI typed content parts -> (text, reasoning); reasoning/thinking parts are the trace."""
    texts, traces = [], []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in REASONING_PART_TYPES:
            trace = next((part[k] for k in ("text", kind, "reasoning_content") if isinstance(part.get(k), str)), None)
            if trace is None:
                raise ReasoningError(f"{where}[{j}]: a {kind!r} part needs its text in 'text'")
            traces.append(trace)
        else:
            raise ReasoningError(f"{where}[{j}]: only text and reasoning parts can be trained on, got "
                                 f"{str(kind or type(part).__name__)!r}")
    return "".join(texts), ("\n\n".join(traces) if traces else None)


def read_reasoning(message: dict[str, Any], content: str, where: str) -> tuple[str, str | None]:
    """(answer, trace) of an assistant message: a reasoning key, or `<think>` inside the content."""
    keyed = [k for k in REASONING_KEYS if message.get(k) not in (None, "")]
    if len(keyed) > 1:
        raise ReasoningError(f"{where}: both {keyed[0]!r} and {keyed[1]!r} are set; keep one")
    if keyed:
        trace = message[keyed[0]]
        if not isinstance(trace, str):
            raise ReasoningError(f"{where}.{keyed[0]} must be a string, got {type(trace).__name__}")
        return content, trace
    trace, answer = split_think(content)
    return answer, trace


def has_reasoning(messages: list[dict[str, Any]]) -> bool:
    return any(m.get("reasoning_content") for m in messages)


def template_reads_reasoning(tokenizer) -> bool:
    """Does the chat template render `reasoning_content` itself?"""
    return "reasoning_content" in str(getattr(tokenizer, "chat_template", "") or "")


def inline(trace: str, answer: str) -> str:
    """The documented default rendering of a trace before its answer."""
    return f"{THINK_OPEN}\n{trace}\n{THINK_CLOSE}\n\n{answer}"


def messages_to_render(messages: list[dict[str, Any]], mode: str, template_knows: bool
                       ) -> tuple[list[dict[str, Any]], list[str | None]]:
    """The messages to give the template, and each assistant message's trace (None: none rendered)."""
    out, traces = [], []
    for message in messages:
        trace = message.get("reasoning_content") or None
        if message["role"] != "assistant":
            out.append(message)
            continue
        rest = {k: v for k, v in message.items() if k != "reasoning_content"}
        if trace is None or mode == "drop":
            out.append(rest)
            traces.append(None)
        elif template_knows:
            out.append(message)
            traces.append(trace)
        else:
            out.append({**rest, "content": inline(trace, rest.get("content") or "")})
            traces.append(trace)
    return out, traces


def reasoning_block(text: str, span: tuple[int, int], trace: str) -> tuple[int, int] | None:
    """Characters of the rendered trace inside an assistant span, tags included; None if not rendered."""
    start, end = span
    found = text.find(trace, start, end) if trace else -1
    if found < 0:
        return None
    opening = text.rfind(THINK_OPEN, start, found)
    block_start = opening if opening >= 0 and not text[opening + len(THINK_OPEN):found].strip() else found
    closing = _BLOCK_END.match(text, found + len(trace))
    block_end = min(end, closing.end() if closing else found + len(trace))
    return block_start, block_end


def split_spans(text: str, spans: list[tuple[int, int]], traces: list[str | None], mask: bool
                ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(the spans to train, the reasoning blocks) given each assistant span's trace; `mask` cuts the
    blocks out of the trained spans."""
    trained, blocks = [], []
    for span, trace in zip(spans, traces):
        block = reasoning_block(text, span, trace) if trace else None
        if block is None:
            trained.append(span)
            continue
        blocks.append(block)
        if not mask:
            trained.append(span)
            continue
        trained += [s for s in ((span[0], block[0]), (block[1], span[1])) if s[1] > s[0]]
    return trained, blocks
