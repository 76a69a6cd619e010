"""Preference data for DPO and KTO: detect the format of a file and parse its rows.

Paired formats (DPO; KTO unpairs them: chosen -> desirable, rejected -> undesirable):

    preference          {"prompt"?, "chosen", "rejected"}  strings or message lists (TRL); without
                        "prompt", chosen and rejected are whole conversations sharing the prompt turns
    sharegpt_ranking    {"conversations", "chosen": {"from", "value"}, "rejected": {...}, "system"?, "tools"?}
                        (LLaMA-Factory's `ranking: true` ShareGPT data, e.g. dpo_en_demo.json)

Unpaired formats (KTO), `label` true for a desirable completion:

    kto_messages           {"messages", "label"}  the last message is the completion (kto_en_demo.json)
    kto_sharegpt           {"conversations", "kto_tag"}  the last turn is the completion
    kto_prompt_completion  {"prompt", "completion", "label"}  (TRL's unpaired form)

Every paired format parses into a `PreferencePair`, every unpaired one into an `UnpairedExample`;
the messages use the same shape as SFT conversations (see `conversation.py`), so the model's own
chat template renders them. A completion is exactly one assistant message (it may call tools).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, get_args

from h1tune.config import PreferenceFormat
from h1tune.data.formats import RowError, parse_row
from h1tune.data.reasoning import split_think

PREFERENCE_FORMATS: tuple[str, ...] = get_args(PreferenceFormat)  # detection order: most specific keys first
PAIRED_FORMATS = ("sharegpt_ranking", "preference")
UNPAIRED_FORMATS = tuple(f for f in PREFERENCE_FORMATS if f not in PAIRED_FORMATS)

REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "sharegpt_ranking": ("conversations", "chosen", "rejected"),
    "preference": ("chosen", "rejected"),
    "kto_sharegpt": ("conversations", "kto_tag"),
    "kto_messages": ("messages", "label"),
    "kto_prompt_completion": ("prompt", "completion", "label"),
}
OPTIONAL_KEYS: dict[str, tuple[str, ...]] = {
    "sharegpt_ranking": ("system", "tools"),
    "preference": ("prompt", "tools"),
    "kto_sharegpt": ("system", "tools"),
    "kto_messages": ("tools",),
    "kto_prompt_completion": ("tools",),
}
_BOOL_STRINGS = {"true": True, "false": False}  # CSV cells


@dataclass
class _Located:
    format: str
    source: str
    row: int
    line: int | None

    @property
    def where(self) -> str:
        """`file.jsonl:12` for line-based files, `file.json row 3` otherwise (as for SFT data)."""
        return f"{self.source}:{self.line}" if self.line is not None else f"{self.source} row {self.row}"


@dataclass
class PreferencePair(_Located):
    """A prompt (messages) with a preferred and a dispreferred completion (one assistant message each)."""

    prompt: list[dict[str, Any]]
    chosen: dict[str, Any]
    rejected: dict[str, Any]
    tools: list[Any] | None = None

    def unpaired(self) -> list[UnpairedExample]:
        """KTO's view of a pair: the chosen completion desirable, the rejected one not (as TRL unpairs)."""
        common = dict(format=self.format, source=self.source, row=self.row, line=self.line,
                      prompt=self.prompt, tools=self.tools)
        return [UnpairedExample(completion=self.chosen, label=True, **common),
                UnpairedExample(completion=self.rejected, label=False, **common)]


@dataclass
class UnpairedExample(_Located):
    """A prompt with one completion and whether it is desirable (KTO)."""

    prompt: list[dict[str, Any]]
    completion: dict[str, Any]
    label: bool
    tools: list[Any] | None = None


def is_paired(fmt: str) -> bool:
    return fmt in PAIRED_FORMATS


def expected_keys(fmt: str) -> str:
    """`'messages', 'label' (optional: 'tools')` for error messages."""
    need = ", ".join(repr(k) for k in REQUIRED_KEYS[fmt])
    optional = OPTIONAL_KEYS[fmt]
    return need + (f" (optional: {', '.join(repr(k) for k in optional)})" if optional else "")


def describe_formats(formats: tuple[str, ...] = PREFERENCE_FORMATS) -> str:
    return "; ".join(f"{fmt}: {expected_keys(fmt)}" for fmt in formats)


def detect_preference_format(row: Any) -> str | None:
    """The first preference format whose required keys are all in the row, or None.

    A `label` only makes a row KTO data when it is a boolean (or the text true/false of a CSV cell),
    so an SFT file with some other `label` column is not mistaken for KTO data.
    """
    if not isinstance(row, dict):
        return None
    for fmt in PREFERENCE_FORMATS:
        if all(key in row for key in REQUIRED_KEYS[fmt]):
            if "label" in REQUIRED_KEYS[fmt] and _bool_or_none(row["label"]) is None:
                continue
            return fmt
    return None


def is_prompt_row(row: Any) -> bool:
    """GRPO's data: a `prompt` with no completion, or GSM8K's `question` + `answer`."""
    return isinstance(row, dict) and (("prompt" in row and not {"completion", "chosen", "rejected"} & set(row))
                                      or {"question", "answer"} <= set(row))


def sft_refusal(name: str, row: Any) -> str | None:
    """Why a file cannot be SFT data when its first row is preference data (None when it is not).

    Read as SFT, `dpo_en_demo.json` trains on earlier turns and ignores chosen/rejected, and
    `kto_en_demo.json` trains on its undesirable replies; both must be refused, not misread.
    """
    if is_prompt_row(row):
        return (f"{name}: rows carry a prompt and no answer to learn ({', '.join(repr(k) for k in row)[:80]}): "
                "prompts for online RL. Set training.objective: grpo (with training.rewards), or give SFT data")
    fmt = detect_preference_format(row)
    if fmt is None:
        return None
    keys = ", ".join(repr(k) for k in REQUIRED_KEYS[fmt])
    objective = "dpo (or kto)" if is_paired(fmt) else "kto"
    return (f"{name}: rows carry {keys}, which is {'preference' if is_paired(fmt) else 'KTO'} data "
            f"(format {fmt!r}); SFT would ignore {'chosen/rejected' if is_paired(fmt) else 'the labels'} "
            f"and train on the wrong text. Set training.objective: {objective} to tune on it, or give SFT data")


def parse_preference_row(row: Any, fmt: str, source: str, row_number: int,
                         line: int | None) -> PreferencePair | UnpairedExample:
    """Parse one row; raises RowError naming the field that is wrong (the caller adds file and row)."""
    if not isinstance(row, dict):
        raise RowError(f"expected an object with keys {expected_keys(fmt)}, got {type(row).__name__}")
    missing = [key for key in REQUIRED_KEYS[fmt] if row.get(key) is None]
    if missing:
        found = ", ".join(repr(k) for k in row) or "none"
        raise RowError(f"{fmt} row is missing {', '.join(repr(k) for k in missing)} "
                       f"(expected keys {expected_keys(fmt)}; found {found})")
    where = dict(format=fmt, source=source, row=row_number, line=line)
    return _PARSERS[fmt](row, where)


# --- helpers -----------------------------------------------------------------------------------


def _renamed(exc: RowError, old: str, new: str) -> RowError:
    """An SFT parser's error about field `old`, reworded for the preference field `new`."""
    return RowError(str(exc).replace(old, new, 1))


def _messages(value: Any, name: str) -> list[dict[str, Any]]:
    """A message list (or its JSON string), parsed by the SFT `messages` parser."""
    try:
        messages, _, _ = parse_row({"messages": value}, "messages")
    except RowError as exc:
        raise _renamed(exc, "messages", name) from None
    return messages


def _sharegpt(turns: Any, name: str, row: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], Any]:
    """ShareGPT turns (with the row's system and tools when given), parsed by the SFT parser."""
    wrapped = {k: row[k] for k in ("system", "tools") if row and row.get(k) is not None}
    try:
        messages, tools, _ = parse_row({**wrapped, "conversations": turns}, "sharegpt")
    except RowError as exc:  # a single turn (chosen/rejected) is named as itself, not as turn 0
        raise _renamed(exc, "conversations" if name == "conversations" else "conversations[0]", name) from None
    return messages, tools


def _prompt(value: Any, name: str) -> list[dict[str, Any]]:
    """A prompt: a user string, or messages that end where the assistant's completion starts."""
    messages = [{"role": "user", "content": value}] if isinstance(value, str) else _messages(value, name)
    if messages and messages[-1]["role"] == "assistant":
        raise RowError(f"'{name}' ends with an assistant turn, so the completion would be a second assistant "
                       "turn in a row; end the prompt with the user (or tool) turn the completion answers")
    return messages


def _completion(messages: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """Exactly one assistant message: the completion that is scored."""
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        roles = ", ".join(m["role"] for m in messages) or "none"
        raise RowError(f"'{name}' must be one assistant message (got {len(messages)} message(s): {roles}); "
                       "multi-turn completions are not supported for preference tuning")
    return messages[0]


def _completion_value(value: Any, name: str) -> dict[str, Any]:
    if isinstance(value, str):  # a leading <think>…</think> is the completion's reasoning trace
        trace, answer = split_think(value)
        return {"role": "assistant", "content": answer, **({"reasoning_content": trace} if trace else {})}
    return _completion(_messages(value, name), name)


def _bool_or_none(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _BOOL_STRINGS.get(value.strip().lower())
    return None


def _label(value: Any, name: str) -> bool:
    label = _bool_or_none(value)
    if label is None:
        raise RowError(f"'{name}' must be true (desirable) or false (undesirable), got {value!r}")
    return label


def _tools(row: dict[str, Any]) -> list[Any] | None:
    if row.get("tools") is None:
        return None
    _, tools, _ = parse_row({"messages": [], "tools": row["tools"]}, "messages")
    return tools


def _split_last(messages: list[dict[str, Any]], name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(prompt, completion) of a conversation whose last message is the scored completion."""
    if not messages:
        raise RowError(f"'{name}' is empty; it needs the prompt turns and a final assistant completion")
    completion = messages[-1]
    if completion["role"] != "assistant":
        raise RowError(f"'{name}' must end with the assistant completion, but its last message is "
                       f"{completion['role']!r}")
    prompt = messages[:-1]
    if prompt and prompt[-1]["role"] == "assistant":
        raise RowError(f"'{name}' ends with two assistant turns; the completion must answer a user (or tool) turn")
    return prompt, completion


# --- the formats -------------------------------------------------------------------------------


def _parse_preference(row: dict[str, Any], where: dict[str, Any]) -> PreferencePair:
    if row.get("prompt") is not None:
        prompt = _prompt(row["prompt"], "prompt")
        chosen, rejected = _completion_value(row["chosen"], "chosen"), _completion_value(row["rejected"], "rejected")
    else:  # TRL's implicit prompt: two whole conversations that differ only in the last message
        if isinstance(row["chosen"], str) or isinstance(row["rejected"], str):
            raise RowError("without 'prompt', 'chosen' and 'rejected' must be message lists that share the "
                           "prompt turns; add a 'prompt' field for plain-text completions")
        prompt, chosen = _split_last(_messages(row["chosen"], "chosen"), "chosen")
        rejected_prompt, rejected = _split_last(_messages(row["rejected"], "rejected"), "rejected")
        if rejected_prompt != prompt:
            raise RowError("'chosen' and 'rejected' must share every message but the last (the prompt); they "
                           "differ earlier. Give the prompt separately in a 'prompt' field")
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, tools=_tools(row), **where)


def _parse_sharegpt_ranking(row: dict[str, Any], where: dict[str, Any]) -> PreferencePair:
    prompt, tools = _sharegpt(row["conversations"], "conversations", row)
    if prompt and prompt[-1]["role"] == "assistant":
        raise RowError("'conversations' ends with an assistant turn; the chosen/rejected turns answer the last "
                       "human (or observation) turn, so it must end there")
    sides = {}
    for name in ("chosen", "rejected"):
        turn = row[name]
        if not isinstance(turn, dict):
            raise RowError(f"'{name}' must be one turn {{\"from\": \"gpt\", \"value\": ...}}, "
                           f"got {type(turn).__name__}")
        sides[name] = _completion(_sharegpt([turn], name)[0], name)
    return PreferencePair(prompt=prompt, chosen=sides["chosen"], rejected=sides["rejected"], tools=tools, **where)


def _parse_kto_sharegpt(row: dict[str, Any], where: dict[str, Any]) -> UnpairedExample:
    messages, tools = _sharegpt(row["conversations"], "conversations", row)
    prompt, completion = _split_last(messages, "conversations")
    return UnpairedExample(prompt=prompt, completion=completion, label=_label(row["kto_tag"], "kto_tag"),
                           tools=tools, **where)


def _parse_kto_messages(row: dict[str, Any], where: dict[str, Any]) -> UnpairedExample:
    prompt, completion = _split_last(_messages(row["messages"], "messages"), "messages")
    return UnpairedExample(prompt=prompt, completion=completion, label=_label(row["label"], "label"),
                           tools=_tools(row), **where)


def _parse_kto_prompt_completion(row: dict[str, Any], where: dict[str, Any]) -> UnpairedExample:
    return UnpairedExample(prompt=_prompt(row["prompt"], "prompt"),
                           completion=_completion_value(row["completion"], "completion"),
                           label=_label(row["label"], "label"), tools=_tools(row), **where)


_PARSERS: dict[str, Callable[[dict[str, Any], dict[str, Any]], PreferencePair | UnpairedExample]] = {
    "preference": _parse_preference,
    "sharegpt_ranking": _parse_sharegpt_ranking,
    "kto_sharegpt": _parse_kto_sharegpt,
    "kto_messages": _parse_kto_messages,
    "kto_prompt_completion": _parse_kto_prompt_completion,
}
