"""The chunked training loss equals the model's own loss and gradients (lm_head_multiplier included)."""

from __future__ import annotations

import pytest
import torch

from h1tune.data.render import IGNORE_INDEX
from h1tune.presets import build_model
from h1tune.train.loss import chunked_lm_loss


@pytest.mark.parametrize("chunk", [5, 7, 1000])
def test_chunked_loss_and_gradients_equal_the_models_own(chunk):
    model = build_model("tiny", num_hidden_layers=1).train()
    assert model.model.lm_head_multiplier != 1.0  # μP: a loss that omitted it would differ
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (2, 24), generator=gen)
    labels = ids.clone()
    labels[0, :9] = IGNORE_INDEX  # a prompt
    labels[1, 20:] = IGNORE_INDEX  # padding
    count = int((labels[:, 1:] != IGNORE_INDEX).sum())

    reference = model(input_ids=ids, labels=labels, use_cache=False).loss  # mean over labelled tokens
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    total, n = chunked_lm_loss(hidden, labels, model.lm_head, model.model.lm_head_multiplier, chunk_tokens=chunk)
    assert n == count
    loss = total / n
    loss.backward()
    assert torch.allclose(loss, reference, atol=1e-6, rtol=1e-6)
    for name, grad in expected.items():
        assert torch.allclose(model.get_parameter(name).grad, grad, atol=1e-6, rtol=1e-5), name
