"""Tokenize preference examples: the chat template's rendering, split into prompt and completion ids.

The completion is exactly the span the SFT labels train for an assistant turn (`render.py`): from
the end of the assistant header to the end-of-turn token, found with the same prefix renders and
character offsets, so DPO/KTO score the same tokens SFT trains. Tokens after the completion (the
template's trailing newline) are dropped: nothing scores them and, the model being causal, they
change nothing before them. The result is TRL's tokenized layout, which its collators and loss use:

    pairs     {"prompt_ids", "chosen_ids", "rejected_ids"}
    unpaired  {"prompt_ids", "completion_ids", "label"}

`data.max_length` bounds each sequence (prompt + one completion): `truncate` cuts the completion's
end (TRL's keep_start), `drop` drops the example. An example whose completion is cut away, or whose
chosen and rejected tokens are equal (no preference to learn), is dropped and counted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from h1tune.data.preference import PreferencePair, UnpairedExample
from h1tune.data.reasoning import messages_to_render, template_reads_reasoning
from h1tune.data.render import (DROP_TOO_LONG, IGNORE_INDEX, assistant_spans, check_chat_template, label_tokens,
                                with_system_prompt)
from h1tune.errors import DataError

DROP_SAME = "chosen equals rejected"
DROP_COMPLETION_CUT = "completion truncated away"
__all__ = ["DROP_COMPLETION_CUT", "DROP_SAME", "DROP_TOO_LONG", "Fitted", "encode_pair", "encode_unpaired",
           "fit_pair", "fit_unpaired"]


@dataclass
class Fitted:
    """The outcome of applying data.max_length: the example, or why it was dropped."""

    example: dict[str, Any] | None
    reason: str | None = None
    truncated: bool = False



def encode_side(tokenizer, prompt: list[dict[str, Any]], completion: dict[str, Any], tools: list[Any] | None,
                system_prompt: str | None, where: str, reasoning: str = "train") -> tuple[list[int], int]:
    """Token ids of prompt + completion (ending with the completion) and where the completion starts.

    A completion's reasoning trace is rendered (and scored with it) unless data.reasoning is drop."""
    messages, _ = messages_to_render(with_system_prompt([*prompt, completion], system_prompt), reasoning,
                                     template_reads_reasoning(tokenizer))
    text, spans = assistant_spans(tokenizer, messages, tools, where)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    labels = label_tokens(encoding["offset_mapping"], spans[-1:], ids)
    scored = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not scored:
        raise DataError(f"{where}: the completion renders to no tokens with this chat template")
    return ids[: scored[-1] + 1], scored[0]


def encode_pair(pair: PreferencePair, tokenizer, data_cfg) -> dict[str, list[int]]:
    """TRL's `{prompt_ids, chosen_ids, rejected_ids}`; the prompt is the tokens both sides share."""
    check_chat_template(tokenizer, assistant_only_loss=True)
    chosen, chosen_start = encode_side(tokenizer, pair.prompt, pair.chosen, pair.tools, data_cfg.system_prompt,
                                       pair.where, data_cfg.reasoning)
    rejected, rejected_start = encode_side(tokenizer, pair.prompt, pair.rejected, pair.tools,
                                           data_cfg.system_prompt, pair.where, data_cfg.reasoning)
    # Equal up to the completion for any prefix-stable template; the min guards odd tokenizers that
    # merge a token across the prompt/completion boundary (TRL makes the same choice).
    shared = len(os.path.commonprefix([chosen, rejected]))
    cut = min(chosen_start, rejected_start, shared)
    return {"prompt_ids": chosen[:cut], "chosen_ids": chosen[cut:], "rejected_ids": rejected[cut:]}


def encode_unpaired(example: UnpairedExample, tokenizer, data_cfg) -> dict[str, Any]:
    """TRL's `{prompt_ids, completion_ids, label}`."""
    check_chat_template(tokenizer, assistant_only_loss=True)
    ids, start = encode_side(tokenizer, example.prompt, example.completion, example.tools, data_cfg.system_prompt,
                             example.where, data_cfg.reasoning)
    return {"prompt_ids": ids[:start], "completion_ids": ids[start:], "label": example.label}


def _cut(prompt: int, completion: list[int], max_length: int, truncation: str) -> tuple[list[int] | None, str | None]:
    """One completion fitted after a prompt of `prompt` tokens: (ids, None) or (None, drop reason)."""
    if prompt + len(completion) <= max_length:
        return completion, None
    if truncation == "drop":
        return None, DROP_TOO_LONG
    if prompt >= max_length:
        return None, DROP_COMPLETION_CUT
    return completion[: max_length - prompt], None


def fit_pair(example: dict[str, list[int]], max_length: int, truncation: str) -> Fitted:
    """Apply data.max_length to both sequences of a pair; equal chosen/rejected are dropped."""
    if example["chosen_ids"] == example["rejected_ids"]:
        return Fitted(None, DROP_SAME)
    prompt = len(example["prompt_ids"])
    chosen, why = _cut(prompt, example["chosen_ids"], max_length, truncation)
    rejected, why_rejected = _cut(prompt, example["rejected_ids"], max_length, truncation)
    if why or why_rejected:
        return Fitted(None, why or why_rejected)
    if chosen == rejected:
        return Fitted(None, DROP_SAME)  # they differed only past max_length
    truncated = len(chosen) < len(example["chosen_ids"]) or len(rejected) < len(example["rejected_ids"])
    return Fitted({**example, "chosen_ids": chosen, "rejected_ids": rejected}, None, truncated)


def fit_unpaired(example: dict[str, Any], max_length: int, truncation: str) -> Fitted:
    """Apply data.max_length to one prompt + completion."""
    completion, why = _cut(len(example["prompt_ids"]), example["completion_ids"], max_length, truncation)
    if why:
        return Fitted(None, why)
    return Fitted({**example, "completion_ids": completion}, None, len(completion) < len(example["completion_ids"]))
