"""Parse rows of the five supported data formats into `Conversation`s.

    messages           {"messages": [{"role", "content"}, ...], "tools"?}      (OpenAI / HF chat)
    sharegpt           {"conversations": [{"from", "value"}, ...], "tools"?, "system"?}
    alpaca             {"instruction", "input"?, "output", "system"?, "history"?}
    prompt_completion  {"prompt", "completion"}  (strings, or lists of messages as in TRL)
    text               {"text"}  (continued pre-training: every token is trained)

The format is detected per source from the first row's keys, or set with `format:` in the
data config. ShareGPT `function_call` turns (a JSON string `{"name", "arguments"}`, or a list of
them) become assistant `tool_calls`, and `observation` turns become `tool` messages, which is how
LLaMA-Factory's glaive tool-call data is meant to be read.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from h1tune.data.conversation import FORMATS, ROLES, Conversation
from h1tune.data.reasoning import REASONING_KEYS, ReasoningError, content_parts, read_reasoning

# What each format needs, for detection and for the "expected ..." part of error messages.
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
OPTIONAL_KEYS: dict[str, tuple[str, ...]] = {
    "messages": ("tools",),
    "sharegpt": ("tools", "system"),
    "alpaca": ("input", "system", "history", *REASONING_KEYS),
    "prompt_completion": (),
    "text": (),
}
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool", "tool": "tool",
}


class RowError(ValueError):
    """A problem in one row; the caller adds the file and row."""


def expected_keys(fmt: str) -> str:
    """`'instruction', 'output' (optional: 'input', 'system', 'history')` for error messages."""
    need = ", ".join(repr(k) for k in REQUIRED_KEYS[fmt])
    optional = OPTIONAL_KEYS[fmt]
    return need + (f" (optional: {', '.join(repr(k) for k in optional)})" if optional else "")


# Keys read on each message / turn of a list (anything else, e.g. a tool message's `name`, is not trained on).
_CHAT_KEYS = ("role", "content", "tool_calls", *REASONING_KEYS)
MESSAGE_KEYS = {"messages": _CHAT_KEYS, "conversations": ("from", "value", *REASONING_KEYS),
                "prompt": _CHAT_KEYS, "completion": _CHAT_KEYS}


def unused_keys(row: Any, fmt: str) -> list[str]:
    """Keys of a row, or of its messages (`messages[].reasoning_content`), that format `fmt` does not read:
    they would be silently ignored. Each key counts once per row."""
    if not isinstance(row, dict):
        return []
    known = set(REQUIRED_KEYS[fmt]) | set(OPTIONAL_KEYS[fmt])
    found = [str(k) for k in row if k not in known]
    for name, keys in MESSAGE_KEYS.items():
        if name in known and isinstance(row.get(name), list):
            extra = {str(k) for m in row[name] if isinstance(m, dict) for k in m if k not in keys}
            found += [f"{name}[].{k}" for k in sorted(extra)]
    return found


def detect_format(row: Any) -> str | None:
    """The first format whose required keys are all in the row, or None."""
    if not isinstance(row, dict):
        return None
    for fmt in FORMATS:
        if all(key in row for key in REQUIRED_KEYS[fmt]):
            return fmt
    return None


def describe_formats() -> str:
    """One line per format with its keys, for 'cannot detect the format' errors."""
    return "; ".join(f"{fmt}: {expected_keys(fmt)}" for fmt in FORMATS)


def parse_row(row: Any, fmt: str) -> tuple[list[dict[str, Any]], list[Any] | None, str | None]:
    """(messages, tools, text) of one row; raises RowError naming the field that is wrong."""
    if not isinstance(row, dict):
        raise RowError(f"expected an object with keys {expected_keys(fmt)}, got {type(row).__name__}")
    nulls = [key for key in REQUIRED_KEYS[fmt] if key in row and row[key] is None]
    if nulls:
        raise RowError(f"{fmt} row has {', '.join(repr(k) for k in nulls)} set to null; give "
                       f"{'it' if len(nulls) == 1 else 'them'} a value (or drop the row)")
    missing = [key for key in REQUIRED_KEYS[fmt] if key not in row]
    if missing:
        found = ", ".join(repr(k) for k in row) or "none"
        raise RowError(
            f"{fmt} row is missing {', '.join(repr(k) for k in missing)} "
            f"(expected keys {expected_keys(fmt)}; found {found})"
        )
    return _PARSERS[fmt](row)


def to_conversation(row: Any, fmt: str, source: str, row_number: int, line: int | None) -> Conversation:
    """Parse one row into a Conversation (RowError propagates to the caller, who collects them)."""
    messages, tools, text = parse_row(row, fmt)
    return Conversation(messages=messages, tools=tools, text=text, format=fmt,
                        source=source, row=row_number, line=line)


# --- helpers -----------------------------------------------------------------------------------


def _json_field(value: Any, name: str, kind: type) -> Any:
    """Accept a field as a value or as a JSON string of it (CSV cells, glaive's `tools`)."""
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        if not text:
            return kind()
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RowError(f"'{name}' is a string that is not valid JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(value, kind):
        raise RowError(f"'{name}' must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"'{name}' must be a string, got {type(value).__name__}")
    return value


def _tools(row: dict[str, Any]) -> list[Any] | None:
    if row.get("tools") is None:
        return None
    tools = _json_field(row["tools"], "tools", list)
    return tools or None


def _tool_call(call: Any, name: str) -> dict[str, Any]:
    """Normalize `{name, arguments}` or `{type, function: {name, arguments}}` to the HF shape.

    `arguments` given as a JSON string is decoded: chat templates `tojson` it, and a string
    would be rendered double-quoted.
    """
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        call = call["function"]
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise RowError(f"{name} must be {{\"name\": ..., \"arguments\": {{...}}}}, got {str(call)[:80]!r}")
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            pass  # a free-text argument string is kept as written
    return {"type": "function", "function": {"name": call["name"], "arguments": arguments}}


# --- the formats -------------------------------------------------------------------------------


def _parse_messages(row: dict[str, Any]):
    raw = _json_field(row["messages"], "messages", list)
    return messages_list(raw, "messages"), _tools(row), None


def messages_list(raw: list[Any], name: str) -> list[dict[str, Any]]:
    """Chat messages, validated: roles, tool calls, text or typed content parts, reasoning traces."""
    messages = []
    for i, message in enumerate(raw):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise RowError(f"{where} must be an object with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise RowError(f"{where}: unknown role {role!r}; allowed roles are {', '.join(ROLES)}")
        calls = message.get("tool_calls") or []
        if calls and role != "assistant":
            raise RowError(f"{where}: only assistant messages may have 'tool_calls' (role is {role!r})")
        content = message.get("content")
        if content is None and calls:
            content = ""
        out: dict[str, Any] = {"role": role, **_content(message, content, role, where)}
        if calls:
            calls = _json_field(calls, f"{where}.tool_calls", list)
            out["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
        messages.append(out)
    return messages


def _content(message: dict[str, Any], content: Any, role: str, where: str) -> dict[str, Any]:
    """`content` (a string, or OpenAI typed parts) and, on assistant turns, `reasoning_content` from any of
    the conventions reasoning.py reads."""
    try:
        trace = None
        if isinstance(content, list):
            content, trace = content_parts(content, f"{where}.content")
        content = _string(content, f"{where}.content")
        if role == "assistant":
            content, keyed = read_reasoning(message, content, where)
            trace = "\n\n".join(t for t in (trace, keyed) if t) or None
    except ReasoningError as exc:
        raise RowError(str(exc)) from None
    if trace is not None and role != "assistant":
        raise RowError(f"{where}: only assistant turns carry reasoning (role is {role!r})")
    return {"content": content, **({"reasoning_content": trace} if trace else {})}


def _parse_sharegpt(row: dict[str, Any]):
    turns = _json_field(row["conversations"], "conversations", list)
    messages: list[dict[str, Any]] = []
    if row.get("system"):
        messages.append({"role": "system", "content": _string(row["system"], "system")})
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RowError(f"{where} must be an object with 'from' and 'value', got {str(turn)[:80]!r}")
        speaker = turn["from"]
        if speaker not in SHAREGPT_ROLES:
            raise RowError(f"{where}: unknown role {speaker!r}; allowed roles are {', '.join(SHAREGPT_ROLES)}")
        if speaker == "function_call":
            _attach_tool_calls(messages, _function_call(_string(turn["value"], f"{where}.value"), where))
        else:
            role = SHAREGPT_ROLES[speaker]
            messages.append({"role": role, **_content(turn, turn["value"], role, f"{where}.value")})
    return messages, _tools(row), None


def _function_call(value: str, where: str) -> list[dict[str, Any]]:
    try:
        calls = json.loads(value)
    except json.JSONDecodeError as exc:
        raise RowError(f"{where}: a function_call value must be a JSON string "
                       f"{{\"name\": ..., \"arguments\": ...}} ({exc.msg} at char {exc.pos})") from None
    calls = calls if isinstance(calls, list) else [calls]
    return [_tool_call(c, f"{where}.value") for c in calls]


def _attach_tool_calls(messages: list[dict[str, Any]], calls: list[dict[str, Any]]) -> None:
    """Attach tool calls to the assistant turn they belong to.

    A `gpt` turn followed by `function_call` is one assistant turn that talks, then calls; two
    function_calls in a row are parallel calls. Anything else starts a new assistant turn.
    """
    if messages and messages[-1]["role"] == "assistant":
        messages[-1].setdefault("tool_calls", []).extend(calls)
    else:
        messages.append({"role": "assistant", "content": "", "tool_calls": calls})


def _parse_alpaca(row: dict[str, Any]):
    instruction = _string(row["instruction"], "instruction")
    extra = row.get("input")
    extra = _string(extra, "input") if extra is not None else ""
    prompt = f"{instruction}\n{extra}" if extra else instruction  # LLaMA-Factory joins them this way
    messages: list[dict[str, Any]] = []
    if row.get("system"):
        messages.append({"role": "system", "content": _string(row["system"], "system")})
    history = _json_field(row["history"], "history", list) if row.get("history") is not None else []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise RowError(f"history[{i}] must be a [user, assistant] pair of strings, got {str(pair)[:80]!r}")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages += [{"role": "user", "content": prompt},
                 {"role": "assistant", **_content(row, row["output"], "assistant", "output")}]
    return messages, None, None


def _parse_prompt_completion(row: dict[str, Any]):
    def side(name: str, role: str) -> list[dict[str, Any]]:
        value = row[name]
        if isinstance(value, list):
            return messages_list(value, name)
        return [{"role": role, **_content({}, value, role, name)}]

    return side("prompt", "user") + side("completion", "assistant"), _tools(row), None


def _parse_text(row: dict[str, Any]):
    return [], None, _string(row["text"], "text")


_PARSERS: dict[str, Callable[[dict[str, Any]], tuple]] = {
    "messages": _parse_messages,
    "sharegpt": _parse_sharegpt,
    "alpaca": _parse_alpaca,
    "prompt_completion": _parse_prompt_completion,
    "text": _parse_text,
}
