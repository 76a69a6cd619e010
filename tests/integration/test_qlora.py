"""QLoRA on CPU: NF4 base, out_proj and lm_head kept whole, one training step moves only LoRA weights."""

from __future__ import annotations

import math

import pytest
import torch

from h1tune.adapters import apply_adapter
from h1tune.config import config_from_dict
from h1tune.errors import H1tuneError
from h1tune.model import load_model, verify_unquantized
from h1tune.adapters.probe import probe_adapters
from h1tune.presets import build_model



@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny2")
    build_model("tiny", num_hidden_layers=2).save_pretrained(path, safe_serialization=True)
    return str(path)


def _cfg(checkpoint, **model):
    return config_from_dict({"model": {"name_or_path": checkpoint, "quantization": "4bit", "dtype": "float32",
                                       **model}})


def _quantized(model):
    return {n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}


def test_user_skip_list_without_lm_head_still_keeps_both(checkpoint):
    model = load_model(_cfg(checkpoint, llm_int8_skip_modules=["gate_proj"]).model, announce=False)
    quantized = _quantized(model)
    assert len(quantized) == 2 * 7  # q k v o in_proj up down; gate_proj skipped by the user
    assert not any(n.endswith(("out_proj", "lm_head", "gate_proj")) for n in quantized)
    assert type(model.lm_head) is torch.nn.Linear
    assert type(model.model.layers[0].mamba.out_proj) is torch.nn.Linear


def test_verify_unquantized_fails_loudly(checkpoint):
    model = load_model(_cfg(checkpoint).model, announce=False)
    model.model.layers[1].mamba.out_proj = model.model.layers[1].mamba.in_proj  # a Linear4bit in the wrong place
    with pytest.raises(H1tuneError, match=r"layers\.1\.mamba\.out_proj"):
        verify_unquantized(model)


def test_qlora_training_step(checkpoint):
    cfg = _cfg(checkpoint)
    model = apply_adapter(load_model(cfg.model, announce=False), cfg)
    assert model.is_activation_checkpointing
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    frozen_4bit = {n: p.detach().clone() for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"}
    assert frozen_4bit
    ids = torch.randint(5, 1024, (2, 32), generator=torch.Generator().manual_seed(0))
    # As train.py runs it: on the k-bit, checkpointed model (per group here, to keep the test fast).
    report = probe_adapters(model, {"input_ids": ids}, max_module_forwards=0)
    assert report.ok and len(report.rows) == 2 * 8
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    opt.step()
    assert math.isfinite(loss.item())
    params = dict(model.named_parameters())
    changed = [n for n, before in trainable.items() if not torch.equal(params[n].detach(), before)]
    assert [n for n in trainable if "lora_B" in n and n not in changed] == []
    assert all(torch.equal(params[n].detach(), before) for n, before in frozen_4bit.items())
