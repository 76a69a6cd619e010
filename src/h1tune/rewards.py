"""Verifiable rewards for GRPO: the built-ins, user functions, and the checks run before the first step.

    training:
      objective: grpo
      rewards: [{name: math_answer}, {name: think_format, weight: 0.2}, {function: my_rewards.py:score}]

Every reward takes TRL's signature, `fn(prompts, completions, **columns) -> list[float | None]`, where
`completions` are strings (or, for chat prompts, lists with one assistant message) and `columns` are
the row's other fields (e.g. `answer`), one value per completion. The built-ins:

- `math_answer`: 1.0 when the completion's final answer (the last `\\boxed{...}`, else `#### n`, else
  the last number) equals the row's `answer` numerically (GSM8K's `... #### 42` answers are read
  the same way), else 0.0.
- `think_format`: 1.0 for exactly one `<think>…</think>` followed by a non-empty answer, else 0.0.
- `tool_call`: 1.0 for a `<tool_call>` that calls a tool of the row's `tools` with arguments valid
  against its JSON schema (required keys present, JSON types matching), 0.5 for a listed tool with
  invalid arguments, else 0.0.
- `length`: 1 - |length - target| / target in characters (`target` per reward, default 200), >= 0.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable

from h1tune.config_checks import BUILTIN_NAMES
from h1tune.errors import ConfigError

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"


def completion_text(completion: Any) -> str:
    """A completion as text: TRL passes strings, or [{"role": "assistant", "content": ...}] for chat prompts."""
    if isinstance(completion, list):
        return "".join(str(m.get("content") or "") for m in completion if isinstance(m, dict))
    return str(completion)


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").strip().rstrip("."))
    except ValueError:
        return None


def final_answer(text: str) -> float | None:
    """The last \\boxed{...}, else a `#### n` line, else the last number in `text`, as a number."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if boxed:
        found = re.findall(_NUMBER, boxed[-1])
        return _number(found[-1]) if found else None
    hashes = re.findall(rf"####\s*({_NUMBER})", text)
    if hashes:
        return _number(hashes[-1])
    numbers = re.findall(_NUMBER, text.split("</think>")[-1])
    return _number(numbers[-1]) if numbers else None


def math_answer(prompts, completions, answer=None, **_) -> list[float | None]:
    if answer is None:
        raise ValueError("math_answer needs an `answer` column in the data (the reference number, or GSM8K's "
                         "'... #### n')")
    scores = []
    for completion, reference in zip(completions, answer):
        got, want = final_answer(completion_text(completion)), final_answer(str(reference))
        scores.append(1.0 if got is not None and want is not None and math.isclose(got, want, rel_tol=1e-6,
                                                                                     abs_tol=1e-9) else 0.0)
    return scores


def think_format(prompts, completions, **_) -> list[float]:
    pattern = re.compile(r"^\s*<think>(?:(?!<think>|</think>).)+</think>\s*\S", re.S)
    return [1.0 if pattern.match(t := completion_text(c)) and t.count("<think>") == 1 else 0.0 for c in completions]


def _type_ok(value: Any, kind: str | None) -> bool:
    types = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list, "object": dict}
    if kind not in types:
        return True
    if kind in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, types[kind])


def _arguments_valid(arguments: Any, schema: dict) -> bool:
    if not isinstance(arguments, dict):
        return False
    properties = schema.get("properties", {}) if isinstance(schema, dict) else {}
    if any(key not in arguments for key in schema.get("required", []) if isinstance(schema, dict)):
        return False
    return all(_type_ok(value, properties.get(key, {}).get("type")) for key, value in arguments.items()
               if key in properties)


def tool_call(prompts, completions, tools=None, **_) -> list[float]:
    from h1tune.generate import parse_tool_calls

    scores = []
    for completion, listed in zip(completions, tools if tools is not None else [None] * len(completions)):
        specs = {}
        for tool in listed or []:
            spec = tool.get("function", tool) if isinstance(tool, dict) else {}
            if isinstance(spec.get("name"), str):
                specs[spec["name"]] = spec.get("parameters") or {}
        _, calls = parse_tool_calls(completion_text(completion))
        if not calls or any(c["name"] not in specs for c in calls):
            scores.append(0.0)
        else:
            scores.append(1.0 if all(_arguments_valid(c["arguments"], specs[c["name"]]) for c in calls) else 0.5)
    return scores


def length_reward(target: int) -> Callable:
    def length(prompts, completions, **_) -> list[float]:
        return [max(0.0, 1.0 - abs(len(completion_text(c)) - target) / target) for c in completions]

    return length


BUILTINS: dict[str, Callable] = {"math_answer": math_answer, "think_format": think_format, "tool_call": tool_call}
# BUILTIN_NAMES (config_checks, which validates configs without importing this) == (*BUILTINS, "length"): tested


@functools.lru_cache(maxsize=None)
def _import(module_part: str):
    """A reward file (or module), imported once per process: `check` and the trainer share it, and a
    file's top-level code (loading a verifier, say) runs once. A failed import is not cached."""
    if not module_part.endswith(".py"):
        return importlib.import_module(module_part)
    path = Path(module_part).expanduser()
    loaded = importlib.util.spec_from_file_location(f"h1tune_rewards_{path.stem}", path)
    module = importlib.util.module_from_spec(loaded)
    sys.modules[loaded.name] = module
    loaded.loader.exec_module(module)
    return module


def load_function(spec: str, where: str) -> Callable:
    """`path/to/file.py:function` (or `module:function`) -> the function; a clear ConfigError otherwise."""
    module_part, _, name = spec.rpartition(":")
    if not module_part or not name:
        raise ConfigError(f"{where}: {spec!r} must be 'path/to/rewards.py:function' or 'module:function'")
    if module_part.endswith(".py") and not Path(module_part).expanduser().is_file():
        raise ConfigError(f"{where}: {module_part!r} does not exist (paths are relative to the config file)")
    try:
        module = _import(module_part)
    except Exception as exc:  # the user's module failed to import: say which and why, before any model loads
        raise ConfigError(f"{where}: importing {module_part!r} failed: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{where}: {module_part!r} has no function {name!r}")
    return fn


def check_reward(fn: Callable, name: str, sample: dict[str, list]) -> None:
    """Call a reward on a few real prompts with dummy completions; its return must be a list of floats
    (or None) of the same length. Raised as a ConfigError naming the reward, before the first step."""
    try:
        inspect.signature(fn).bind(sample["prompts"], sample["completions"], **sample["columns"])
    except TypeError as exc:
        raise ConfigError(f"training.rewards: {name!r} does not take TRL's arguments (prompts, completions, "
                          f"**columns with {sorted(sample['columns'])}): {exc}; give it a `**kwargs`") from None
    try:
        scores = fn(sample["prompts"], sample["completions"], **sample["columns"])
    except Exception as exc:
        raise ConfigError(f"training.rewards: {name!r} failed on the first prompts: {type(exc).__name__}: "
                          f"{exc}") from None
    count = len(sample["completions"])
    if not isinstance(scores, (list, tuple)) or len(scores) != count or not all(
            s is None or (isinstance(s, (int, float)) and not isinstance(s, bool)) for s in scores):
        shown = json.dumps(scores, default=str)[:120]
        raise ConfigError(f"training.rewards: {name!r} must return a list of {count} floats (None to skip), one "
                          f"per completion; it returned {shown}")
