"""Step 2: the adapter probe under the fused Mamba kernel, on the 0.5B shape (tiny in the dry run).

Two probes on the training path (model.train(), use_cache=False) of a model loaded as h1tune
loads it: h1tune's default LoRA targets must all be live; a LoRA that also wraps every bypassed
Linear of the policy (mamba.out_proj), forced past peft's Mamba guard, must have exactly those
modules reported inert — the kernel reads their weight raw, so their forward never runs and no
gradient reaches them. On a GPU that is mamba_ssm's `mamba_split_conv1d_scan_combined`; in the dry
run the pure-torch stand-in with its signature (tests/unit/fused_double.py) takes its place.
"""

from __future__ import annotations

from gpu_steps.common import Ctx, StepResult, install_fused_stand_in, seed_all


def _bypassed_linears(model) -> list[str]:
    """Module paths of the Linears the policy names as read raw by the fused kernel."""
    import torch

    from h1tune.policy import BYPASSED_MODULES

    return [name for name, module in model.named_modules()
            if name.rsplit(".", 1)[-1] in BYPASSED_MODULES and isinstance(module, torch.nn.Linear)]


def _forced_lora(model):
    """Default targets plus the bypassed Linears, past peft's guard (h1tune itself refuses them)."""
    from h1tune.adapters.lora import resolve_targets
    from h1tune.config import AdapterConfig
    from h1tune.presets import lora_past_mamba_guard

    return lora_past_mamba_guard(model, resolve_targets(model, AdapterConfig()) + _bypassed_linears(model))


def _group_rows(label: str, report) -> list[list]:
    groups: dict[str, list] = {}
    for row in report.rows:
        groups.setdefault(row.group, []).append(row)
    rows = []
    for group, members in groups.items():
        inert = [r for r in members if r.inert]
        kinds = sorted({r.name.rsplit(".", 1)[-1] for r in inert})
        rows.append([label, group, len(members), len(members) - len(inert), len(inert),
                     min(r.grad_norm for r in members), min(r.delta_loss for r in members),
                     f"inert: {', '.join(kinds)} ({inert[0].why})" if inert else "all live"])
    return rows


def run(ctx: Ctx) -> StepResult:
    import torch

    from h1tune.adapters import apply_adapter, probe_adapters
    from h1tune.config import H1tuneConfig, ModelConfig
    from h1tune.model import load_model

    seed_all(0)
    model_cfg = ModelConfig(name_or_path=ctx.preset, dtype=ctx.dtype)
    base = load_model(model_cfg, device_map=ctx.device if ctx.cuda else None, announce=False)
    kernel = "mamba_ssm.ops.triton.ssd_combined.mamba_split_conv1d_scan_combined (real)"
    if not ctx.cuda:
        kernel = install_fused_stand_in()
    # A real batch on the training path, short enough for one forward per module (the dry run: 2 x 32).
    length = 128 if ctx.cuda else 32
    ids = torch.randint(5, 1000, (2, length), generator=torch.Generator().manual_seed(0)).to(ctx.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    per_module = 10_000  # one forward per module even on the 0.5B shape (324 modules): |dloss| of each alone

    lora = apply_adapter(base, H1tuneConfig(model=model_cfg))
    defaults = probe_adapters(lora, batch, strict=False, max_module_forwards=per_module)
    base = lora.unload()  # the same base weights, adapter layers removed
    expected = sorted(_bypassed_linears(base))
    forced = probe_adapters(_forced_lora(base), batch, strict=False, max_module_forwards=per_module)

    inert = sorted(forced.inert)
    forced_rows_ok = all(r.executed is False and not r.grad_reached for r in forced.rows if r.inert)
    passed = defaults.ok and inert == expected and bool(expected) and forced_rows_ok
    rows = _group_rows("defaults", defaults) + _group_rows("defaults + bypassed Linears", forced)
    summary = (f"defaults: {len(defaults.rows) - len(defaults.inert)}/{len(defaults.rows)} live; forced: "
               f"{len(inert)} inert, {'exactly' if inert == expected else 'NOT exactly'} the {len(expected)} "
               f"bypassed Linears")
    notes = [f"model: preset {ctx.preset}, {ctx.dtype} on {ctx.device}, batch 2x{length}, one forward per module",
             f"fused kernel: {kernel}"]
    if inert != expected:
        notes.append(f"PROBLEM: inert {inert[:4]} ... vs expected {expected[:4]} ...")
    if not defaults.ok:
        notes.append(f"PROBLEM: default targets inert: {defaults.inert[:6]}")
    data = {"kernel": kernel, "defaults": {"modules": len(defaults.rows), "inert": defaults.inert,
                                           "loss": defaults.loss, "seconds": defaults.seconds},
            "forced": {"modules": len(forced.rows), "inert": inert, "expected_inert": expected,
                       "inert_never_executed": forced_rows_ok, "loss": forced.loss, "seconds": forced.seconds}}
    columns = ["probe", "group", "modules", "live", "inert", "min grad norm", "min |dloss|", "verdict"]
    return StepResult(passed, summary, columns, rows, data, notes)
