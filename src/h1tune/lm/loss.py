"""The one causal-LM loss h1tune computes itself: shifted cross-entropy over labelled tokens.

Training loss comes from the model (transformers' loss); this is what h1tune adds on top of it:
a token-weighted eval loss (summed, divided once, so independent of batch size and padding) and
the adapter probe's float64 loss. Both call `shifted_cross_entropy`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from h1tune.data.render import IGNORE_INDEX


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *,
                          reduction: Literal["sum", "mean", "none"] = "sum",
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Cross-entropy of position t's logits against label t+1, ignoring IGNORE_INDEX labels.

    `dtype` is the precision of the softmax: fp32 for evaluation, float64 for the probe (μP's small
    lm_head multiplier makes fp32 loss changes sub-ulp there).
    """
    shift_logits = logits[:, :-1].to(dtype).reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].to(logits.device).reshape(-1)
    return torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX,
                                             reduction=reduction)


def labelled_tokens(labels: torch.Tensor) -> int:
    """How many positions carry loss after the shift."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def token_loss_sum(model: Any, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled tokens of `batch`, and their count."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    return shifted_cross_entropy(logits, labels, reduction="sum"), labelled_tokens(labels)


def row_loss_sums(model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `batch`: the summed cross-entropy (float64) and the labelled-token count.

    Per row, not per batch, so that several ranks can gather them and drop the rows accelerate
    repeated to even out the last round (H1Trainer.evaluate); the sum over rows is token_loss_sum's.
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    per_token = shifted_cross_entropy(logits, labels, reduction="none").view(labels.shape[0], -1)
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).to(per_token.device)
    return per_token.double().sum(dim=1), counts


def final_hidden_states(model: Any, causal_lm: Any, **inputs) -> torch.Tensor:
    """The normed hidden states the lm_head would read, from a forward through every wrapper of `model` (DDP,
    peft) with `logits_to_keep=1`, so the full logits are never made (chunked_lm_loss makes them a chunk at
    a time). `causal_lm` is the FalconH1ForCausalLM inside `model`."""
    captured = []
    hook = causal_lm.model.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        model(**inputs, logits_to_keep=1, use_cache=False)
    finally:
        hook.remove()
    return captured[-1]


CHUNK_LOGIT_BYTES = 2**27  # fp32 logits held at once by the chunked loss (~128 MiB: 1,024 tokens of a 32k vocab)


def chunked_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: Any, multiplier: float,
                    chunk_tokens: int | None = None, shifted: bool = False) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy computed from hidden states a chunk of tokens at a time.

    Equal to the model's own loss, Falcon-H1's `lm_head_multiplier` included (Liger's fused linear
    cross-entropy leaves it out), but the [tokens, vocab] logits and their gradient never exist
    whole: each chunk's logits are recomputed in backward (non-reentrant checkpoint). At 2x1024
    tokens and a 32k vocabulary that is ~0.8 GB less at the peak for one extra lm_head matmul.
    """
    from torch.utils.checkpoint import checkpoint

    # shifted: labels[t] already is token t+1's (a context-parallel slice, whose last target lives on the next rank)
    shift_hidden = (hidden if shifted else hidden[:, :-1]).reshape(-1, hidden.shape[-1])
    shift_labels = (labels if shifted else labels[:, 1:]).to(hidden.device).reshape(-1)
    keep = shift_labels != IGNORE_INDEX
    shift_hidden, shift_labels = shift_hidden[keep], shift_labels[keep]
    vocab = lm_head.weight.shape[0]
    step = chunk_tokens or max(1, CHUNK_LOGIT_BYTES // (4 * vocab))

    def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = lm_head(h) * multiplier
        return torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    # at least one (maybe empty) chunk: a row with no labelled token still gives a loss in the graph,
    # which DDP needs to reduce gradients on every rank (transformers' loss is one too)
    for start in range(0, max(shift_labels.numel(), 1), step):
        h, y = shift_hidden[start:start + step], shift_labels[start:start + step]
        total = total + (checkpoint(chunk_loss, h, y, use_reentrant=False) if torch.is_grad_enabled()
                         else chunk_loss(h, y))
    return total, int(keep.sum())
