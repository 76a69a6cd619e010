"""The memory estimate decides gradient checkpointing, and refuses runs that cannot fit."""

from __future__ import annotations

from h1tune.presets import build_model
from h1tune.train import memory


def frozen_base(preset: str = "0.5b"):
    """The base as LoRA leaves it: frozen (the adapters themselves are a rounding error here)."""
    model = build_model(preset, device="meta")
    model.requires_grad_(False)
    return model


def test_auto_checkpointing_follows_the_estimate():
    model = frozen_base()
    tokens = 2 * 1024
    roomy = memory.plan_memory("auto", model, tokens, available=200 * memory.GiB)
    tight = memory.plan_memory("auto", model, tokens, available=8 * memory.GiB)
    assert not roomy.checkpointing and tight.checkpointing
    assert tight.with_checkpointing < tight.without_checkpointing
    # the 0.5B shape without checkpointing at 2x1024 tokens measured near 21 GB: the estimate is of that size
    assert 14 * memory.GiB < roomy.without_checkpointing < 28 * memory.GiB
    assert "GiB available" in tight.summary() and "on: without it" in tight.summary()
    full = build_model("0.5b", device="meta")  # full fine-tuning: fp32 grads and Adam states on top
    assert memory.plan_memory(True, full, tokens).estimate > tight.with_checkpointing + 7 * memory.GiB
    forced = memory.plan_memory(False, model, tokens, available=8 * memory.GiB)
    assert not forced.checkpointing and "WARNING" in forced.reason


def test_a_run_that_cannot_fit_even_with_checkpointing_is_refused(monkeypatch):
    model = frozen_base()
    plan = memory.plan_memory("auto", model, 64 * 4096, available=8 * memory.GiB)
    monkeypatch.setattr(memory.os, "sysconf", lambda name: 4096 if name == "SC_PAGE_SIZE" else 2**20)  # 4 GiB
    text = memory.refusal(plan, 64 * 4096)
    assert text and "per_device_train_batch_size" in text and "4.0 GiB" in text
