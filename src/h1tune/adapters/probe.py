"""The adapter probe: prove on a real batch that every adapter can move the loss before training.

    report = probe_adapters(model, {"input_ids": ids, "attention_mask": mask})   # raises ProbeError if inert
    print(report.format_table())

A LoRA that a fused kernel bypasses (Falcon-H1's mamba.out_proj: the kernel reads the raw weight)
trains nothing and raises no error. The probe runs exactly the path training runs (`model.train()`,
`use_cache=False`, whatever kernels are installed) and checks, per adapter module: its forward ran,
a gradient reached its parameters, and perturbing its lora_B changes the loss. It leaves the model
bit-identical and the global RNG state as it found it.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from h1tune.data.render import IGNORE_INDEX
from h1tune.errors import H1tuneError
from h1tune.policy import param_group

# Batch keys collators add for the loss mask; the model's forward does not take them.
_NON_MODEL_KEYS = {"completion_mask", "assistant_masks", "prompt_mask", "num_items_in_batch"}
# Above this many modules, the loss change is measured per group (one forward each), not per module:
# the probe then costs 2 + groups forwards. Forward-ran and gradient-reached stay per module, and they
# are what a kernel bypass fails (its LoRA never runs), so a single inert module is still named.
MAX_MODULE_FORWARDS = 12


@dataclass
class ProbeRow:
    """One adapter module (LoRA) or one module owning trainable parameters (full fine-tuning)."""

    name: str
    group: str
    executed: bool | None  # None: not a criterion (full fine-tuning: kernels may read weights raw, legitimately)
    grad_reached: bool
    grad_norm: float
    delta_loss: float
    scope: str  # "module": delta_loss from perturbing this module alone; "group": its whole group at once
    threshold: float

    @property
    def inert(self) -> bool:
        return not (self.executed is not False and self.grad_reached and self.delta_loss > self.threshold)

    @property
    def why(self) -> str:
        if self.executed is False:
            return "forward never ran (bypassed by a kernel)"
        if not self.grad_reached:
            return "no gradient"
        if not self.delta_loss > self.threshold:
            return "loss unchanged when perturbed"
        return ""


@dataclass
class ProbeReport:
    """The probe's findings; `ok` when no adapter is inert."""

    rows: list[ProbeRow]
    loss: float
    kind: str  # "lora" or "full"
    seconds: float
    tokens: int
    notes: list[str] = field(default_factory=list)
    unmeasured: str | None = None  # why the probe could not measure anything (its failure, not the adapters')

    @property
    def inert(self) -> list[str]:
        return [r.name for r in self.rows if r.inert]

    @property
    def ok(self) -> bool:
        return bool(self.rows) and not self.inert and self.unmeasured is None

    def format_table(self) -> str:
        width = max([len("module")] + [len(r.name) for r in self.rows])
        lines = [f"{'module':<{width}}  {'group':<9} {'fwd':>3} {'grad':>4} {'grad norm':>10} {'|dloss|':>10} "
                 f"{'scope':<6} verdict"]
        for r in self.rows:
            fwd = "-" if r.executed is None else ("yes" if r.executed else "no")
            verdict = f"INERT: {r.why}" if r.inert else "ok"
            lines.append(f"{r.name:<{width}}  {r.group:<9} {fwd:>3} {'yes' if r.grad_reached else 'no':>4} "
                         f"{r.grad_norm:>10.3e} {r.delta_loss:>10.3e} {r.scope:<6} {verdict}")
        lines.append(f"loss {self.loss:.4f} on {self.tokens} tokens; {len(self.rows)} modules, "
                     f"{len(self.inert)} inert; {self.seconds:.1f}s")
        return "\n".join(lines + self.notes)

    def summary_line(self) -> str:
        kind = "LoRA modules" if self.kind == "lora" else "modules with trainable weights"
        return (f"adapter probe: {len(self.rows) - len(self.inert)}/{len(self.rows)} {kind} live on "
                f"{self.tokens} tokens in {self.seconds:.1f}s")

    def format_group_lines(self) -> list[str]:
        """One line per group: live count, gradient norms, smallest loss change, inert names."""
        groups: dict[str, list[ProbeRow]] = {}
        for r in self.rows:
            groups.setdefault(r.group, []).append(r)
        lines = []
        for group, rows in groups.items():
            live = [r for r in rows if not r.inert]
            norms = [r.grad_norm for r in rows]
            line = (f"{group}: {len(live)}/{len(rows)} live, grad norm median {statistics.median(norms):.2e}, "
                    f"min |dloss| {min(r.delta_loss for r in rows):.2e} ({rows[0].scope})")
            dead = [r.name for r in rows if r.inert]
            if dead:
                line += f"; INERT: {', '.join(dead[:4])}{' ...' if len(dead) > 4 else ''}"
            lines.append(line)
        return lines

    def raise_if_inert(self) -> "ProbeReport":
        if self.unmeasured is not None:
            raise ProbeError(self, (
                f"adapter probe: could not measure: {self.unmeasured}. This is the probe's failure, not the "
                "adapters' (nothing says they are inert). Check that training examples carry trained tokens "
                "(`h1tune check CONFIG --show-example 2` marks them), or turn the guarantee off with "
                "adapter.probe: false"))
        if not self.rows:
            raise ProbeError(self, "adapter probe: the model has no trainable adapter or parameter; "
                                   "apply_adapter(model, cfg) first")
        if self.inert:
            dead = [r for r in self.rows if r.inert]
            shown = "; ".join(f"{r.name} ({r.why})" for r in dead[:6]) + (" ..." if len(dead) > 6 else "")
            raise ProbeError(self, (
                f"adapter probe: {len(dead)} of {len(self.rows)} adapters are inert on the training path "
                f"(model.train(), use_cache=False, the installed kernels), so they would never train: {shown}. "
                "A LoRA on mamba.out_proj or mamba.conv1d is bypassed by the fused Mamba kernel, which reads "
                "the weight raw: remove it from adapter.target_modules (default targets: attention, mamba "
                "in_proj, mlp). Otherwise check for frozen or merged adapters and zero multipliers."))
        return self


class ProbeError(H1tuneError):
    """Some adapter cannot move the loss; `.report` holds the whole table."""

    def __init__(self, report: ProbeReport, message: str):
        self.report = report
        super().__init__(message)


def _lora_units(model: Any) -> dict[str, list[tuple[Any, Any]]]:
    """LoRA layers -> [(lora_B param, lora_A param)] for each active adapter."""
    units = {}
    for name, module in model.named_modules():
        if not (hasattr(module, "lora_A") and hasattr(module, "lora_B") and hasattr(module, "active_adapters")):
            continue
        pairs = [(module.lora_B[a].weight, module.lora_A[a].weight) for a in module.active_adapters
                 if a in module.lora_B]
        if pairs:
            units[name.removeprefix("base_model.model.")] = [module, pairs]
    return units


def _full_units(model: Any) -> dict[str, list[Any]]:
    """Modules that own trainable parameters directly (full fine-tuning)."""
    units = {}
    for name, module in model.named_modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if params:
            units[name] = [module, params]
    return units


def _model_inputs(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    import torch

    device = next(model.parameters()).device
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
              if k not in _NON_MODEL_KEYS}
    if "input_ids" not in inputs:
        raise H1tuneError("adapter probe: the batch needs input_ids")
    labels = inputs.pop("labels", None)
    if labels is None:
        labels = inputs["input_ids"].clone()
        if "attention_mask" in inputs:
            labels[inputs["attention_mask"] == 0] = IGNORE_INDEX
    inputs["use_cache"] = False
    return inputs, labels


def _trained_tensors(unit: list, kind: str) -> list:
    """Every trainable tensor of a unit: LoRA's A and B factors, or a module's own parameters."""
    return [t for pair in unit[1] for t in pair] if kind == "lora" else unit[1]


def _gradient_rows(units: dict, kind: str) -> dict[str, tuple[bool, float]]:
    """Per unit: did a finite, non-zero gradient reach it, and its norm."""
    rows = {}
    for name, unit in units.items():
        grads = [t.grad for t in _trained_tensors(unit, kind) if t.grad is not None]
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads)) if grads else 0.0
        rows[name] = (bool(grads) and norm > 0 and math.isfinite(norm), norm)
    return rows


def _loss_changes(units: dict, kind: str, loss_now, base: float, *, by_group: bool, scale: float,
                  seed: int) -> dict[str, float]:
    """|Δloss| when each unit's lora_B (or weights, full FT) is perturbed; restored bit-exactly after."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    batches: dict[str, list[str]] = {}
    for name in units:
        batches.setdefault(param_group(name) if by_group else name, []).append(name)
    deltas = {}
    for members in batches.values():
        targets = [t for n in members for t in
                   ([pair[0] for pair in units[n][1]] if kind == "lora" else units[n][1])]
        saved = [t.detach().clone() for t in targets]
        with torch.no_grad():
            for t in targets:
                rms = 1.0 if kind == "lora" else max(float(t.float().pow(2).mean().sqrt()), 1e-2)
                noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
                t.add_((scale * rms * noise).to(device=t.device, dtype=t.dtype))
            try:
                changed = abs(float(loss_now(False)) - base)
            finally:
                for t, s in zip(targets, saved):
                    t.copy_(s)
        deltas.update(dict.fromkeys(members, changed))
    return deltas


def _unmeasured(kind: str, inputs: dict, start: float, strict: bool, why: str) -> ProbeReport:
    report = ProbeReport(rows=[], loss=0.0, kind=kind, seconds=time.perf_counter() - start,
                         tokens=int(inputs["input_ids"].numel()), unmeasured=why)
    return report.raise_if_inert() if strict else report


def probe_adapters(model: Any, batch: dict[str, Any], *, strict: bool = True, scale: float = 0.25,
                   seed: int = 1234, max_module_forwards: int = MAX_MODULE_FORWARDS) -> ProbeReport:
    """Run one forward/backward on `batch` in training mode and report, per adapter, whether it is live.

    Args:
        model: a PeftModel (LoRA) or a model prepared for full fine-tuning (`apply_adapter`).
        batch: as training feeds it, short (Batches.probe_batch: two windows with labelled tokens).
        strict: raise ProbeError (an H1tuneError carrying `.report`) when any adapter is inert.
        scale: size of the random perturbation of lora_B (relative to each weight's RMS for full FT).
        seed: seeds dropout identically in every forward so loss changes come from the perturbation only.
        max_module_forwards: above this many modules the loss change is measured once per group.

    The model is left bit-identical (parameters, grads, train/eval flags) and the global RNG state restored.
    """
    import torch

    from h1tune.lm.loss import shifted_cross_entropy

    start = time.perf_counter()
    lora = _lora_units(model)
    kind = "lora" if lora else "full"
    units = lora or _full_units(model)
    inputs, labels = _model_inputs(model, batch)
    scored = int((labels[..., 1:] != IGNORE_INDEX).sum())  # the model predicts token t+1 from t
    if not scored:
        return _unmeasured(kind, inputs, start, strict, "the probe batch has no labelled token (zero loss and gradients)")
    params = list(model.parameters())
    saved_grads = [p.grad for p in params]
    saved_modes = {m: m.training for m in model.modules()}
    calls = dict.fromkeys(units, 0)
    hooks = [unit[0].register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
             for name, unit in units.items()] if kind == "lora" else []
    cuda = [d for d in {p.device.index for p in params if p.device.type == "cuda"} if d is not None]
    by_group = len(units) > max_module_forwards

    def loss_now(grad: bool) -> torch.Tensor:
        torch.manual_seed(seed)
        torch.clear_autocast_cache()  # under autocast, a perturbed weight's cached bf16 copy would be stale
        with torch.set_grad_enabled(grad):  # float64: μP's small lm_head multiplier makes fp32 changes sub-ulp
            return shifted_cross_entropy(model(**inputs).logits, labels, reduction="mean", dtype=torch.float64)

    try:
        with torch.random.fork_rng(devices=cuda):
            for p in params:
                p.grad = None
            model.train()
            loss = loss_now(True)
            if loss.requires_grad:
                loss.backward()
            for h in hooks:
                h.remove()
            grads = _gradient_rows(units, kind)
            for p in params:
                p.grad = None
            base = float(loss_now(False))
            threshold = max(10 * abs(base - float(loss.detach())), 1e-9 * max(1.0, abs(base)))
            deltas = _loss_changes(units, kind, loss_now, base, by_group=by_group, scale=scale, seed=seed)
    finally:
        for h in hooks:
            h.remove()
        for p, g in zip(params, saved_grads):
            p.grad = g
        for m, mode in saved_modes.items():
            m.training = mode

    rows = [ProbeRow(name=n, group=param_group(n), executed=(calls[n] > 0) if kind == "lora" else None,
                     grad_reached=grads[n][0], grad_norm=grads[n][1], delta_loss=deltas[n],
                     scope="group" if by_group else "module", threshold=threshold) for n in units]
    notes = [f"({len(units)} modules > {max_module_forwards}: |dloss| measured per group; forward and gradient "
             "checks are per module)"] if by_group else []
    report = ProbeReport(rows=rows, loss=base, kind=kind, seconds=time.perf_counter() - start,
                         tokens=int(inputs["input_ids"].numel()), notes=notes, unmeasured=_no_gradient(rows, base, scored))
    return report.raise_if_inert() if strict else report


def _no_gradient(rows: list[ProbeRow], loss: float, scored: int) -> str | None:
    """Every adapter ran, yet no gradient reached any: the probe measured nothing (not a bypass)."""
    if rows and all(r.executed is not False for r in rows) and not any(r.grad_reached for r in rows):
        return (f"the loss ({loss:.4g} on {scored} labelled tokens) gives no gradient to any trainable weight "
                "although every adapter ran (a zero or non-finite loss, or a zero multiplier after them)")
    return None
