"""GRPO's built-in rewards on hand-made completions, and user reward functions checked before training."""

from __future__ import annotations

import pytest

from h1tune.errors import ConfigError
from h1tune.rewards import (check_reward, final_answer, length_reward, load_function, math_answer, think_format,
                            tool_call)

CHAT = [{"role": "user", "content": "q"}]


def as_chat(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def test_final_answer_reads_boxed_hashes_and_the_last_number():
    assert final_answer(r"so \boxed{1,234.5} is it") == 1234.5
    assert final_answer("Natalia sold 48/2 = 24 clips.\n#### 72") == 72
    assert final_answer("<think>maybe 3 or 4</think> The answer is -7.") == -7
    assert final_answer("no number here") is None


def test_math_answer_compares_numerically_with_the_rows_answer():
    completions = [as_chat(r"\boxed{42}"), as_chat("it is 42.0"), as_chat("41"), "#### 42", as_chat("")]
    assert math_answer([CHAT] * 5, completions, answer=["42", "#### 42", "42", "42", "42"]) == [1, 1, 0, 1, 0]
    with pytest.raises(ValueError, match="needs an `answer` column"):
        math_answer([CHAT], [as_chat("1")])


def test_think_format_wants_one_trace_then_an_answer():
    texts = ["<think>add</think> 5", "<think>add</think>", "5", "<think>a</think><think>b</think> 5",
             "  <think>\nx\n</think>\n\nAnswer"]
    assert think_format([CHAT] * 5, [as_chat(t) for t in texts]) == [1, 0, 0, 0, 1]


def test_tool_call_checks_the_tool_and_its_arguments_against_the_schema():
    tools = [{"name": "get_weather", "parameters": {"type": "object", "required": ["city"],
                                                    "properties": {"city": {"type": "string"}}}}]
    texts = ['<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>',
             '<tool_call>[{"name": "get_weather", "arguments": {"city": "Oslo"}}]</tool_call>',  # Tiny's list
             '<tool_call>{"name": "get_weather", "arguments": {"city": 3}}</tool_call>',
             '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>',
             '<tool_call>{"name": "delete_all", "arguments": {}}</tool_call>', "It is sunny."]
    assert tool_call([CHAT] * 6, texts, tools=[tools] * 6) == [1, 1, 0.5, 0.5, 0, 0]


def test_length_reward_peaks_at_its_target():
    length = length_reward(10)
    assert length([CHAT] * 3, ["x" * 10, "x" * 15, "x" * 40]) == [1.0, 0.5, 0.0]


def test_user_functions_load_from_a_file_and_bad_ones_fail_clearly(tmp_path):
    (tmp_path / "good.py").write_text("def score(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    (tmp_path / "shape.py").write_text("def score(prompts, completions, **kw):\n    return 1.0\n"
                                       "def narrow(prompts):\n    return [1.0]\n")
    sample = {"prompts": [CHAT, CHAT], "completions": [as_chat("a"), as_chat("b")], "columns": {"answer": ["1", "2"]}}
    check_reward(load_function(f"{tmp_path / 'good.py'}:score", "f"), "score", sample)
    with pytest.raises(ConfigError, match="importing .* failed: ModuleNotFoundError"):
        load_function(f"{tmp_path / 'broken.py'}:score", "training.rewards[0].function")
    with pytest.raises(ConfigError, match="has no function 'missing'"):
        load_function(f"{tmp_path / 'good.py'}:missing", "f")
    with pytest.raises(ConfigError, match="must return a list of 2 floats"):
        check_reward(load_function(f"{tmp_path / 'shape.py'}:score", "f"), "score", sample)
    with pytest.raises(ConfigError, match="does not take TRL's arguments"):
        check_reward(load_function(f"{tmp_path / 'shape.py'}:narrow", "f"), "narrow", sample)
    with pytest.raises(ConfigError, match="does not exist"):
        load_function("missing.py:score", "f")


def test_the_config_accepts_exactly_the_built_in_rewards():
    from h1tune.rewards import BUILTIN_NAMES, BUILTINS

    assert BUILTIN_NAMES == (*BUILTINS, "length")
