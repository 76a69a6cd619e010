"""The chunked training loss equals the model's own loss and gradients (lm_head_multiplier included)."""

from __future__ import annotations

import pytest
import torch

from h1tune.data.render import IGNORE_INDEX
from h1tune.presets import build_model
from h1tune.lm.loss import chunked_lm_loss


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


@pytest.mark.parametrize("num_items", [None, 29])
def test_trainer_trains_on_the_chunked_loss_with_the_models_value_and_gradients(tmp_path, num_items):
    """H1Trainer.compute_loss (chunked, logits_to_keep=1) == transformers' compute_loss (the model's
    loss), through peft's wrapper, with the Trainer's `num_items_in_batch` normalisation or a mean."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from h1tune.train.trainer import H1Trainer

    torch.manual_seed(0)
    model = get_peft_model(build_model("tiny", num_hidden_layers=2),
                           LoraConfig(r=4, target_modules=["q_proj", "in_proj", "down_proj"], init_lora_weights=False))
    model.train()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = H1Trainer(model=model, args=args)
    ids = torch.randint(5, 1000, (2, 40), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :11] = IGNORE_INDEX
    inputs = {"input_ids": ids, "labels": labels}
    items = None if num_items is None else torch.tensor(num_items)

    def loss_and_grads(compute_loss):
        model.zero_grad()
        loss = compute_loss(trainer, model, dict(inputs), num_items_in_batch=items)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    chunked, chunked_grads = loss_and_grads(H1Trainer.compute_loss)
    reference, reference_grads = loss_and_grads(Trainer.compute_loss)
    assert torch.allclose(chunked, reference, atol=1e-6, rtol=1e-6)
    assert reference_grads.keys() == chunked_grads.keys() and len(reference_grads) == 12
    for name, grad in reference_grads.items():
        assert torch.allclose(chunked_grads[name], grad, atol=1e-6, rtol=1e-5), name


def test_a_row_without_labelled_tokens_still_gives_a_loss_in_the_graph():
    """DDP reduces gradients on every rank each step: a rank whose rows carry no loss (padding rows)
    must still backpropagate, as it does through transformers' loss."""
    model = build_model("tiny", num_hidden_layers=1).train()
    ids = torch.randint(5, 1000, (1, 12))
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    total, n = chunked_lm_loss(hidden, torch.full_like(ids, IGNORE_INDEX), model.lm_head, 1.0)
    assert n == 0 and total.item() == 0.0 and total.requires_grad
    total.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() == 0
