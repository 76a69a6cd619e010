"""Held-out loss and perplexity: the token-weighted loss a training run reports, on any model.

    conversations = read_eval_conversations(cfg.data, seed=cfg.training.seed)
    result = heldout_loss(model, tokenizer, conversations, cfg.data, batch_size=8)
    print(result.loss, result.perplexity, result.tokens)

The data goes through the training pipeline (any supported format, the chat template, labels on
the assistant tokens only, `data.max_length` and `data.truncation`, packed rows when
`data.packing` is on), and the loss is `h1tune.lm.loss.token_loss_sum`, the function
H1Trainer.evaluate sums: every labelled token counts once, so the number depends on neither the
batch size, nor padding, nor packing, and equals the eval loss of a training run on the same set.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from h1tune.config import DataConfig
from h1tune.data.conversation import Conversation
from h1tune.data.render import IGNORE_INDEX
from h1tune.errors import DataError

MAX_EXPONENT = 50.0  # perplexity is reported as exp(min(loss, 50)), as H1Trainer.evaluate does


@dataclass(frozen=True)
class LossResult:
    """Mean next-token loss over every labelled token, and what it was measured on."""

    loss: float
    tokens: int      # labelled (scored) tokens
    examples: int    # conversations after tokenization (truncated ones included, dropped ones not)
    rows: int        # items fed to the model: examples, or packed rows
    dropped: int = 0

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, MAX_EXPONENT))

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "perplexity": self.perplexity}


def read_eval_conversations(data_cfg: DataConfig, seed: int) -> list:
    """The held-out items of `data_cfg`, read and parsed once, before any model loads.

    `data.eval` sources when given (weighted as training weights them), else the `data.eval_fraction`
    of `data.train` that training holds out with the same seed: the run's own eval set. SFT rows give
    Conversations; preference files give their preferred completions (a pair's chosen one, KTO's
    desirable ones), scored on the completion tokens only.

    Raises:
        DataError: no held-out data is named, or a file is unreadable (file and row in the message).
    """
    from h1tune.data.prepare import hold_out
    from h1tune.data.sources import apply_weight

    if data_cfg.eval:
        items: list = []
        for index, source in enumerate(data_cfg.eval):
            data = _read_eval_source(source)
            # the same key as prepare_datasets, so a weighted eval source picks the same rows
            items += apply_weight(data.conversations, data.weight, seed, key=f"eval:{index}:{data.path}")
        return items
    if data_cfg.train and data_cfg.eval_fraction > 0:
        return hold_out([_read_eval_source(s) for s in data_cfg.train], data_cfg.eval_fraction, seed)[1]
    raise DataError("eval data: none given; pass --data FILE (any supported format), or a --config whose "
                    "data.eval (or data.eval_fraction of data.train) names held-out data")


def _read_eval_source(source):
    """An SFT source as Conversations, or a preference source as its preferred completions."""
    from h1tune.data.preference import PREFERENCE_FORMATS, detect_preference_format, is_paired
    from h1tune.data.sources import read_source, source_rows

    fmt = source.format if source.format != "auto" else detect_preference_format(source_rows(source)[1][0][0])
    if fmt not in PREFERENCE_FORMATS:
        return read_source(source)
    from h1tune.data.preference_prepare import read_preference_source

    data = read_preference_source(source, "dpo" if is_paired(fmt) else "kto")
    preferred = [item.unpaired()[0] if hasattr(item, "unpaired") else item for item in data.conversations]
    data.conversations = [item for item in preferred if item.label]
    return data


def tokenize_eval(items: list, tokenizer, data_cfg: DataConfig) -> tuple[list[dict], int]:
    """Tokenized examples with assistant-only (or completion-only) labels, exactly as training builds
    them; and the drop count."""
    from h1tune.data.prepare import tokenize_split

    conversations = [item for item in items if isinstance(item, Conversation)]
    examples, stats = tokenize_split(conversations, tokenizer, data_cfg)
    completions, dropped = _completion_examples([i for i in items if not isinstance(i, Conversation)],
                                                tokenizer, data_cfg)
    examples += completions
    scored = sum(1 for e in examples if any(label != IGNORE_INDEX for label in e["labels"][1:]))
    if not scored:
        reasons = ", ".join(f"{n} {why}" for why, n in stats.dropped.items()) or "no assistant tokens"
        raise DataError(f"eval data: no example has a token to score ({reasons}); check data.max_length "
                        f"({data_cfg.max_length}), data.truncation and that rows have assistant turns")
    return examples, sum(stats.dropped.values()) + dropped


def _completion_examples(items: list, tokenizer, data_cfg: DataConfig) -> tuple[list[dict], int]:
    """Preferred completions as `{input_ids, labels}` with only the completion labelled (as DPO scores it),
    cut to data.max_length like training; the second value counts those dropped."""
    from h1tune.data.preference_tokens import encode_unpaired

    examples, dropped = [], 0
    for item in items:
        encoded = encode_unpaired(item, tokenizer, data_cfg)
        prompt, completion = encoded["prompt_ids"], encoded["completion_ids"]
        room = data_cfg.max_length - len(prompt)
        if room < 1 or (data_cfg.truncation == "drop" and len(completion) > room):
            dropped += 1
            continue
        completion = completion[:room]
        examples.append({"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion})
    return examples, dropped


def token_weighted_loss(model, items: list, collator, batch_size: int) -> tuple[float, int]:
    """Mean of `token_loss_sum` over all batches: summed in float64 and divided once."""
    import torch

    from h1tune.lm.loss import token_loss_sum

    if batch_size < 1:
        raise DataError(f"batch size: must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    tokens = 0
    try:
        with torch.no_grad():
            for start in range(0, len(items), batch_size):
                batch = collator(items[start:start + batch_size])
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                loss, count = token_loss_sum(model, batch)
                loss_sum += loss.double().cpu()
                tokens += count
    finally:
        model.train(was_training)
    return (loss_sum / max(tokens, 1)).item(), tokens


def heldout_loss(model, tokenizer, conversations: list, data_cfg: DataConfig,
                 batch_size: int) -> LossResult:
    """Tokenize `conversations` for this model, batch them like training (padded or packed), score them."""
    from h1tune.lm.batching import make_batches

    examples, dropped = tokenize_eval(conversations, tokenizer, data_cfg)
    batches = make_batches(data_cfg, tokenizer, examples, None)  # the train path: packed rows when packing
    loss, tokens = token_weighted_loss(model, batches.train, batches.collator, batch_size)
    return LossResult(loss=loss, tokens=tokens, examples=len(examples), rows=len(batches.train), dropped=dropped)
