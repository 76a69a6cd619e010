"""transformers' own fused training path on the real kernel: FalconH1Mixer.forward (model.train(),
use_cache=False) -> mamba2_split_conv1d_scan_combined -> mamba_ssm's MambaSplitConv1dScanCombinedFn,
its Triton scan and gated norm run by Triton's interpreter (the conv: triton_sim's torch shim for
causal-conv1d's CUDA functions).

- the adapter probe finds exactly the out_proj and conv1d LoRAs inert (the kernel reads both weights
  raw), and h1tune's default targets all live: the seed's claim, on the real kernel code;
- the fused path equals h1tune's unfused CPU path (its conv and scan, transformers' gated norm):
  logits and every gradient, packed, with the gated norm on;
- packed == each document alone, through the real kernel's seq_idx handling; without seq_idx the
  same comparison fails (the check can fail).

Model-level tolerance 1e-4 on max|Δ| / max|ref| (fp32; measured at most a few 1e-6).
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch
import torch.nn.functional as F

import transformers.models.falcon_h1.modeling_falcon_h1 as mf
from h1tune import ssm
from h1tune.adapters import apply_adapter
from h1tune.adapters.lora import resolve_targets
from h1tune.adapters.probe import probe_adapters
from h1tune.config import AdapterConfig, H1tuneConfig
from h1tune.data.packing import collate_packed
from h1tune.presets import build_model, lora_past_mamba_guard
from h1tune.ssm import triton_sim

pytestmark = pytest.mark.triton

TOL = 1e-4
# Small enough for the interpreter (each kernel program is interpreted): 2 heads x 8, state 16, chunk 16.
MIXER = {"mamba_n_heads": 2, "mamba_d_head": 8, "mamba_d_ssm": 16, "mamba_d_state": 16, "mamba_chunk_size": 16}
LENGTHS = [5, 1, 10, 1, 20, 3]  # as in test_kernels.py: 1-token, chunk-aligned and chunk-straddling documents


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.detach().double()
    return float((got.detach().double() - ref).abs().max()) / (float(ref.abs().max()) or 1.0)


@pytest.fixture
def fused(real):
    """h1tune's seam installed (as in every h1tune run), then Falcon-H1's fused training call sent to the
    real mamba_ssm function. `.calls` records each call (True: it carried seq_idx); `.h1tune_path()`
    puts h1tune's seam function back for a block (it returns None: the mixer then runs unfused)."""
    ssm.install()
    seam_fn = mf.mamba2_split_conv1d_scan_combined
    calls = []
    with triton_sim.fused_kernel_installed(real) as fn:
        def counted(*args, **kwargs):
            calls.append(kwargs.get("seq_idx") is not None)
            return fn(*args, **kwargs)

        @contextlib.contextmanager
        def h1tune_path():
            mf.mamba2_split_conv1d_scan_combined = seam_fn
            try:
                yield
            finally:
                mf.mamba2_split_conv1d_scan_combined = counted

        mf.mamba2_split_conv1d_scan_combined = counted  # fused_kernel_installed restores the seam's
        yield types.SimpleNamespace(calls=calls, h1tune_path=h1tune_path)


@pytest.fixture
def probe_batch():
    ids = torch.randint(5, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_probe_flags_exactly_out_proj_and_conv1d_on_the_real_kernel(fused, probe_batch, record):
    model = build_model("tiny", num_hidden_layers=2, **MIXER)
    bypassed = sorted(f"model.layers.{i}.mamba.{m}" for i in range(2) for m in ("out_proj", "conv1d"))
    conv_channels = model.model.layers[0].mamba.conv1d.weight.shape[0]
    # peft's LoRA on a depthwise conv needs a rank divisible by its groups (= channels)
    lora = lora_past_mamba_guard(model, resolve_targets(model, AdapterConfig()) + bypassed, r=conv_channels,
                                 lora_alpha=2 * conv_channels)
    report = probe_adapters(lora, probe_batch, strict=False)
    assert fused.calls and not any(fused.calls)  # the real kernel ran (no seq_idx in this batch)
    assert sorted(report.inert) == bypassed, report.format_table()
    for row in report.rows:
        if row.inert:
            assert row.executed is False and not row.grad_reached and row.grad_norm == 0
        else:
            assert row.executed and row.grad_reached and row.delta_loss > row.threshold


def test_probe_finds_h1tunes_default_targets_live_on_the_real_kernel(fused, probe_batch):
    model = apply_adapter(build_model("tiny", num_hidden_layers=2, **MIXER), H1tuneConfig())
    report = probe_adapters(model, probe_batch)  # strict: raises if any adapter is inert
    assert fused.calls and report.ok and {r.group for r in report.rows} == {"attention", "mamba", "mlp"}
    assert any(r.name.endswith("mamba.in_proj") for r in report.rows)


def _documents(lengths: list[int]) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(5, 1000, (n,), generator=gen).tolist()} for n in lengths]


def _summed_loss(logits: torch.Tensor, ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Next-token CE summed within each document (never across a boundary), in float64."""
    total, start = logits.new_zeros((), dtype=torch.float64), 0
    for n in lengths:
        if n > 1:
            total = total + F.cross_entropy(logits[start:start + n - 1].double(), ids[start + 1:start + n], reduction="sum")
        start += n
    return total


def _forward_backward(model, lengths: list[int], **batch):
    model.zero_grad(set_to_none=True)
    logits = model(**batch, use_cache=False).logits[0]
    loss = _summed_loss(logits, batch["input_ids"][0], lengths)
    if loss.requires_grad:  # a 1-token document alone predicts nothing
        loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _worst(got: dict, ref: dict) -> tuple[float, str]:
    assert got.keys() == ref.keys()
    return max((rel_err(got[n], ref[n]), n) for n in ref)


@pytest.fixture
def packed_batch():
    batch = collate_packed(_documents(LENGTHS))
    return {k: batch[k] for k in ("input_ids", "position_ids", "seq_idx")}


def test_fused_path_equals_h1tunes_cpu_path_with_the_gated_norm(fused, packed_batch, record):
    """The real fused kernel vs h1tune's unfused path (its conv + scan, transformers' gated norm, out_proj
    as a module), both on one packed row: logits and every parameter's gradient."""
    model = build_model("tiny", num_hidden_layers=1, seed=1, **{**MIXER, "mamba_n_heads": 4, "mamba_d_ssm": 32},
                        mamba_n_groups=2, mamba_rms_norm=True).train()
    logits, grads = _forward_backward(model, LENGTHS, **packed_batch)
    assert fused.calls == [True]
    with fused.h1tune_path():
        ref_logits, ref_grads = _forward_backward(model, LENGTHS, **packed_batch)
    assert fused.calls == [True]  # the unfused run never reached the real kernel
    logit_err = rel_err(logits, ref_logits)
    grad_err, worst = _worst(grads, ref_grads)
    record("fused (real) vs h1tune CPU path: logits", "fp32", logit_err, TOL)
    record("fused (real) vs h1tune CPU path: gradients (worst parameter)", "fp32", grad_err, TOL)
    assert logit_err <= TOL and grad_err <= TOL, (logit_err, grad_err, worst)
    assert "model.layers.0.mamba.norm.weight" in grads and "model.layers.0.mamba.out_proj.weight" in grads


def _leaky_model():
    """A long-memory SSM (|A| in [0.01, 0.1], dt_bias -3): a boundary leak moves the logits by about their size."""
    model = build_model("tiny", num_hidden_layers=1, seed=0, initializer_range=0.1, lm_head_multiplier=1.0,
                        ssm_out_multiplier=1.0, **MIXER)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        mixer = model.model.layers[0].mamba
        mixer.A_log.copy_(torch.log(torch.empty(mixer.A_log.shape).uniform_(0.01, 0.1, generator=gen)))
        mixer.dt_bias.fill_(-3.0)
    return model.train()


def test_packed_equals_each_document_alone_through_the_real_kernel(fused, packed_batch, record):
    model = _leaky_model()
    logits, grads = _forward_backward(model, LENGTHS, **packed_batch)
    assert fused.calls == [True]  # one fused call, with seq_idx

    alone_logits, alone_grads, start = [], {}, 0
    for n in LENGTHS:
        ids = packed_batch["input_ids"][:, start:start + n]
        doc_logits, doc_grads = _forward_backward(model, [n], input_ids=ids)
        alone_logits.append(doc_logits)
        for name, grad in doc_grads.items():
            alone_grads[name] = alone_grads.get(name, 0) + grad
        start += n
    alone = torch.cat(alone_logits)
    logit_err, (grad_err, worst) = rel_err(logits, alone), _worst(grads, alone_grads)
    record("packed vs alone, real fused kernel: logits", "fp32", logit_err, TOL)
    record("packed vs alone, real fused kernel: gradients (worst parameter)", "fp32", grad_err, TOL)
    assert logit_err <= TOL and grad_err <= TOL, (logit_err, grad_err, worst)

    # The control: the same row without seq_idx leaks state across documents, far beyond the tolerance.
    with torch.no_grad():
        leaky = model(input_ids=packed_batch["input_ids"], position_ids=packed_batch["position_ids"],
                      use_cache=False).logits[0]
    leak = rel_err(leaky, alone)
    record("packed WITHOUT seq_idx vs alone (the control: must exceed tolerance)", "fp32", leak, TOL)
    assert leak > 100 * TOL, leak
