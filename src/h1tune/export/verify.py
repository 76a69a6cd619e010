"""Compare two models on the same prompts: next-token logits and greedy decodes.

Used by `h1tune merge` to prove that the merged checkpoint on disk computes what base + adapter
computed, and to put a number on the drift between a QLoRA model and a 16-bit merge of it.

    ref = model_outputs(peft_model, prompts)
    got = model_outputs(merged_model, prompts)
    cmp = compare(ref, got)            # cmp.relative is max |Δlogit| / max |logit|
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from h1tune.errors import H1tuneError

if TYPE_CHECKING:
    import torch

# Tolerance on max |Δlogit| / max |reference logit|, by the dtype the merged weights are stored in.
# fp32: merging only re-associates (W + BA)x vs Wx + B(Ax); measured ~1e-6 relative on the tiny model.
# bf16/fp16: storing W + BA rounds every merged weight once (bf16 keeps 8 mantissa bits, a relative
# step of 2^-8 = 3.9e-3; fp16 keeps 11, 4.9e-4), and on a GPU the reference itself runs in that
# dtype. Those roundings add up over the layers; on the tiny model a bf16 merge measured 3.5e-3
# relative (bench/merge_report.py), so 5e-2 leaves room for deeper models while still catching a
# missing, partial or doubled adapter (those move logits by the adapter's effect: 0.7-0.8 there).
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}

# Fixed conversations rendered with the chat template: a greeting, a system prompt, and multi-turn.
FIXED_CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hello! What can you do?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Explain what a state space model is in two sentences."}],
    [{"role": "user", "content": "Give me a word that rhymes with falcon."},
     {"role": "assistant", "content": "Balcony is close."},
     {"role": "user", "content": "Another one, please."}],
]
FIXED_TEXTS = [
    "The falcon is a bird of prey that",
    "A hybrid model mixes attention with a state space layer, which",
]


@dataclass
class Outputs:
    """What one model produced on the verification prompts (kept on CPU in fp32)."""

    logits: list["torch.Tensor"]  # one (tokens, vocab) tensor per prompt
    greedy: list[list[int]]  # greedy continuation per prompt


@dataclass
class Comparison:
    """Differences between a reference model's outputs and another model's."""

    max_abs: float
    mean_abs: float
    max_logit: float
    argmax_agreement: float  # fraction of prompt positions whose top-1 token agrees
    greedy_same: int  # prompts whose greedy continuation is identical
    prompts: int

    @property
    def relative(self) -> float:
        return self.max_abs / max(self.max_logit, 1e-30)

    def format(self) -> str:
        return (f"max |Δlogit| {self.max_abs:.3g} ({self.relative:.3g} of max |logit| {self.max_logit:.3g}), "
                f"mean {self.mean_abs:.3g}; top-1 agreement {self.argmax_agreement:.1%}; "
                f"greedy decodes identical {self.greedy_same}/{self.prompts}")

    def as_dict(self) -> dict[str, Any]:
        return {"max_abs": self.max_abs, "mean_abs": self.mean_abs, "max_logit": self.max_logit,
                "relative": self.relative, "argmax_agreement": self.argmax_agreement,
                "greedy_same": self.greedy_same, "prompts": self.prompts}


def default_tolerance(dtype: str) -> float:
    return TOLERANCE[dtype]


def read_eval_prompts(path: str | Path, limit: int = 8) -> list[str | list[dict]]:
    """Held-out rows from a .jsonl/.json file: `messages` (chat), `text`, or `prompt`(+`completion`)."""
    path = Path(path)
    if not path.is_file():
        raise H1tuneError(f"eval_prompts: {str(path)!r} does not exist; give a .jsonl file of held-out rows")
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines()
                                                                 if line.strip()]
    except json.JSONDecodeError as exc:
        raise H1tuneError(f"eval_prompts: {path} is not valid JSON/JSONL ({exc})") from None
    prompts: list[str | list[dict]] = []
    for i, row in enumerate(rows[:limit]):
        if isinstance(row, dict) and isinstance(row.get("messages"), list):
            prompts.append(row["messages"])
        elif isinstance(row, dict) and isinstance(row.get("text"), str):
            prompts.append(row["text"])
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
            prompts.append(row["prompt"] + str(row.get("completion", "")))
        else:
            raise H1tuneError(f"eval_prompts: {path} row {i + 1} has none of `messages`, `text`, `prompt`")
    return prompts


def verification_prompts(tokenizer, eval_prompts: str | Path | list | None = None, max_tokens: int = 128,
                         limit: int = 8) -> list[list[int]]:
    """Token ids of the fixed chat conversations plus up to `limit` held-out prompts.

    A conversation is rendered with the chat template as the model will see it when serving (with
    the assistant generation prompt); strings are tokenized as they are. Each is cut to `max_tokens`
    so that the stored reference logits stay small even with a 131k vocabulary.
    """
    if isinstance(eval_prompts, (str, Path)):
        eval_prompts = read_eval_prompts(eval_prompts, limit)
    items: list[str | list[dict]] = list(FIXED_CONVERSATIONS) if tokenizer.chat_template else list(FIXED_TEXTS)
    items += list(eval_prompts or [])[:limit]
    ids = []
    for item in items:
        if isinstance(item, str):
            row = tokenizer(item, add_special_tokens=True)["input_ids"]
        else:
            if not tokenizer.chat_template:
                raise H1tuneError("eval_prompts: conversations need a chat template, and this tokenizer has none; "
                                  "give plain-text prompts instead")
            row = tokenizer.apply_chat_template(item, add_generation_prompt=item[-1]["role"] != "assistant",
                                                tokenize=True, return_dict=True)["input_ids"]
        if row:
            ids.append(list(row)[:max_tokens])
    return ids


def model_outputs(model, prompts: list[list[int]], greedy_tokens: int = 16, eos_ids: list[int] | None = None) -> Outputs:
    """Teacher-forced logits on each prompt, and its greedy continuation."""
    import torch

    device = next(model.parameters()).device
    logits, greedy = [], []
    with torch.no_grad():
        for row in prompts:
            ids = torch.tensor([row], device=device)
            logits.append(model(input_ids=ids).logits[0].float().cpu())
            if greedy_tokens > 0:
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=greedy_tokens, eos_token_id=eos_ids,
                                     pad_token_id=eos_ids[0] if eos_ids else None)
                greedy.append(out[0, ids.shape[1]:].tolist())
            else:
                greedy.append([])
    return Outputs(logits, greedy)


def compare(reference: Outputs, other: Outputs) -> Comparison:
    """Max/mean |Δlogit| over every prompt position, top-1 agreement and identical greedy decodes."""

    diffs = [(a - b).abs() for a, b in zip(reference.logits, other.logits)]
    positions = sum(d.shape[0] for d in diffs)
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(reference.logits, other.logits))
    return Comparison(
        max_abs=float(max(d.max() for d in diffs)),
        mean_abs=float(sum(d.sum() for d in diffs) / sum(d.numel() for d in diffs)),
        max_logit=float(max(a.abs().max() for a in reference.logits)),
        argmax_agreement=agree / max(positions, 1),
        greedy_same=sum(a == b for a, b in zip(reference.greedy, other.greedy)),
        prompts=len(reference.logits),
    ) if diffs else Comparison(0.0, 0.0, 0.0, 1.0, 0, 0)

