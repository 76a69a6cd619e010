"""Full fine-tuning: every trainable parameter moves, frozen groups and the μP mup_vector do not."""

from __future__ import annotations

import torch

from h1tune.adapters import apply_adapter
from h1tune.config import config_from_dict
from h1tune.presets import build_model


def test_full_fine_tuning_step_with_frozen_embeddings():
    cfg = config_from_dict({"adapter": {"method": "full", "freeze": ["embeddings", "mamba_ssm"]}})
    model = apply_adapter(build_model("tiny", num_hidden_layers=2), cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mup = {n: b.clone() for n, b in model.named_buffers() if n.endswith("mup_vector")}
    assert len(mup) == 2
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "model.embed_tokens.weight" in frozen and "model.layers.0.mamba.A_log" in frozen
    assert "model.layers.0.mamba.conv1d.weight" in frozen and "lm_head.weight" not in frozen
    assert "model.layers.0.mamba.out_proj.weight" not in frozen

    ids = torch.randint(5, 1024, (2, 32), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    model.train()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    opt.step()

    for name, param in model.named_parameters():
        moved = not torch.equal(param.detach(), before[name])
        assert moved == (name not in frozen), name
    for name, buf in model.named_buffers():
        if name in mup:
            assert torch.equal(buf, mup[name])
