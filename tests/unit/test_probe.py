"""The adapter probe catches a LoRA that a fused kernel bypasses, and leaves the model untouched.

A pure-torch double of mamba_ssm's fused kernel (tests/unit/fused_double.py) reads conv1d and
out_proj weights raw, as the real kernel does on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from fused_double import fused_kernel, fused_kernel_installed  # noqa: F401  (fused_kernel: pytest fixture)

from h1tune.adapters import apply_adapter
from h1tune.adapters.lora import resolve_targets
from h1tune.config import AdapterConfig, H1tuneConfig
from h1tune.adapters.probe import ProbeError, probe_adapters
from h1tune.presets import build_model, lora_past_mamba_guard

LAYERS = 2


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1024, (2, 32), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _base():
    return build_model("tiny", num_hidden_layers=LAYERS)


def _lora_with_out_proj(model):
    """Force an out_proj adapter past peft's Mamba guard (h1tune itself refuses it)."""
    names = resolve_targets(model, AdapterConfig(target_modules=["mamba"]))
    return lora_past_mamba_guard(model, names + [n.replace("in_proj", "out_proj") for n in names], r=4, lora_alpha=8)


def test_double_matches_the_torch_path(batch):
    model = _base().train()
    ids = batch["input_ids"]
    plain = model(input_ids=ids, labels=ids, use_cache=False)
    plain.loss.backward()
    grad_plain = model.model.layers[0].mamba.out_proj.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    with fused_kernel_installed():
        fused = model(input_ids=ids, labels=ids, use_cache=False)
        fused.loss.backward()
    assert torch.equal(plain.logits, fused.logits)
    torch.testing.assert_close(model.model.layers[0].mamba.out_proj.weight.grad, grad_plain)


def test_probe_passes_on_default_targets_under_the_fused_kernel(fused_kernel, batch):
    model = apply_adapter(_base(), H1tuneConfig())
    report = probe_adapters(model, batch)
    assert report.ok and not report.inert and len(report.rows) == 8 * LAYERS
    assert all(r.executed and r.grad_reached and r.grad_norm > 0 for r in report.rows)
    assert {r.group for r in report.rows} == {"attention", "mamba", "mlp"}
    table = report.format_table()
    assert "model.layers.1.mamba.in_proj" in table and "INERT" not in table
    lines = report.format_group_lines()
    assert len(lines) == 3 and all("live" in line for line in lines)


def test_probe_flags_an_out_proj_adapter_as_inert(fused_kernel, batch):
    model = _lora_with_out_proj(_base())
    with pytest.raises(ProbeError) as err:
        probe_adapters(model, batch)
    report = err.value.report
    assert sorted(report.inert) == [f"model.layers.{i}.mamba.out_proj" for i in range(LAYERS)]
    for row in report.rows:
        if row.inert:
            assert row.executed is False and not row.grad_reached and row.delta_loss <= row.threshold
    message = str(err.value)
    assert "model.layers.0.mamba.out_proj" in message and "fused Mamba kernel" in message
    assert "in_proj" not in " ".join(report.inert)
    assert any("INERT" in line for line in report.format_group_lines())


def test_out_proj_adapter_is_live_on_the_cpu_torch_path(batch):
    """Without kernels out_proj runs as a module: why the static refusal exists, not just the probe."""
    report = probe_adapters(_lora_with_out_proj(_base()), batch, strict=False, max_module_forwards=0)
    assert report.ok


def test_probe_leaves_model_and_rng_untouched(fused_kernel, batch):
    model = apply_adapter(build_model("tiny", num_hidden_layers=1), H1tuneConfig())
    model.eval()
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    lora_b.grad = torch.full_like(lora_b, 0.5)  # a pending gradient must survive too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    probe_adapters(model, batch)
    assert torch.equal(torch.get_rng_state(), rng)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(lora_b.grad, torch.full_like(lora_b, 0.5))
    assert sum(p.grad is not None for p in model.parameters()) == 1
    assert not any(m.training for m in model.modules())


def test_probe_full_fine_tuning_and_group_mode(batch):
    cfg = H1tuneConfig.model_validate({"adapter": {"method": "full", "freeze": ["embeddings"]}})
    model = apply_adapter(build_model("tiny", num_hidden_layers=1), cfg)
    report = probe_adapters(model, batch, max_module_forwards=4)
    assert report.ok and report.kind == "full"
    assert all(r.scope == "group" for r in report.rows)
    assert not any("embed_tokens" in r.name for r in report.rows)
    assert any(r.name.endswith("mamba.conv1d") for r in report.rows)
