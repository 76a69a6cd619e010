"""Per-document attention over packed rows (h1tune.ssm.attention) == transformers' masked SDPA."""

from __future__ import annotations

import torch

from h1tune import ssm
from h1tune.presets import build_model
from h1tune.ssm import attention

LENGTHS = [[7, 30, 1, 26], [64]]  # documents per row, both rows 64 tokens


def packed_batch():
    seq_idx = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in LENGTHS])
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in LENGTHS])
    ids = torch.randint(5, 1000, seq_idx.shape, generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "position_ids": position_ids, "seq_idx": seq_idx.to(torch.int32), "labels": ids}


def loss_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch, use_cache=False)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_document_lengths_follow_seq_idx_changes():
    assert attention.document_lengths(packed_batch()["seq_idx"]) == [[7, 30, 1, 26], [64]]


def test_per_document_attention_equals_the_block_diagonal_mask_forward_and_backward(monkeypatch):
    model = build_model("tiny", num_hidden_layers=2).train()
    batch = packed_batch()
    ssm.install()
    calls = []
    original = attention.document_lengths
    monkeypatch.setattr(attention, "document_lengths", lambda seq_idx: calls.append(1) or original(seq_idx))
    ours, our_grads = loss_and_grads(model, batch)
    assert len(calls) == 2, "each layer's attention went through the per-document path"
    attention.uninstall()  # transformers' SDPA with the block-diagonal mask from position_ids
    try:
        theirs, their_grads = loss_and_grads(model, batch)
    finally:
        ssm.install()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert our_grads.keys() == their_grads.keys()
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_packed_cpu_forward_skips_the_dense_mask_it_would_not_read(monkeypatch):
    """transformers' (length x length) mask costs 4.8 s and 1 GiB at 32K tokens; it is built only for calls
    that still read it (no seq_idx, or after uninstall)."""
    from transformers.models.falcon_h1 import modeling_falcon_h1

    model = build_model("tiny", num_hidden_layers=2).eval()
    batch = {k: v for k, v in packed_batch().items() if k != "labels"}
    built = []
    original = modeling_falcon_h1.create_causal_mask
    monkeypatch.setattr(modeling_falcon_h1, "create_causal_mask", lambda **kw: built.append(1) or original(**kw))
    ssm.install()
    with torch.no_grad():
        model(**batch, use_cache=False)
        assert built == [], "a packed row with seq_idx on CPU built the dense mask"
        model(input_ids=batch["input_ids"], use_cache=False)
        assert built == [1], "an unpacked call still gets its causal mask"
        attention.uninstall()
        try:
            model(**batch, use_cache=False)
        finally:
            ssm.install()
    assert built == [1, 1], "uninstall puts transformers' own forward back"
