"""Step 1: which Mamba implementation each mode really runs, observed call by call.

A counter is put on each of the five kernel functions that FalconH1Mixer looks up at call time
(transformers' seam, where h1tune.ssm.install() puts its dispatcher). For every call it records
who handles it: the real kernel package (the dispatcher hands CUDA tensors to it when
transformers bound the package), h1tune's torch kernel, or transformers' torch fallback. On CUDA
the profiler's kernel names confirm it. Expected on a GPU with the kernels: train = the fused
`mamba_split_conv1d_scan_combined` only; eval = causal_conv1d + the SSD scan; generate adds the
two decode kernels. Expected in the dry run: h1tune's torch kernels for every call.
"""

from __future__ import annotations

import collections
import time

from gpu_steps.common import Ctx, StepResult

REAL, OURS, FALLBACK = "real kernel", "h1tune torch kernel", "transformers torch fallback"
KERNEL_NAME_HINTS = ("chunk_scan", "chunk_state", "state_passing", "bmm_chunk", "chunk_cumsum", "causal_conv1d",
                     "selective_state_update", "selective_scan", "layer_norm_fwd", "rmsnorm")


def _bindings() -> dict[str, tuple[str, bool]]:
    """seam attribute -> (kernel package, whether transformers bound the package instead of torch).

    Reads h1tune.ssm.seam's table and its own check, so this report and the dispatcher agree.
    """
    from h1tune.ssm import seam

    module = seam._falcon_module()
    out = {}
    for name, (_, package, _) in seam._SEAM.items():
        current = getattr(module, name)
        original = getattr(current, seam._ORIGINAL, current)
        out[name] = (package, seam._uses_real_kernel(original, package))
    return out


def _handler(fn, bound_real: bool, args, kwargs) -> str:
    from h1tune.ssm import seam

    tensor = seam._first_tensor(args, kwargs)
    if hasattr(fn, seam._ORIGINAL):  # h1tune's dispatcher
        return REAL if bound_real and tensor is not None and tensor.is_cuda else OURS
    return REAL if bound_real else FALLBACK


def _install_counters(calls: dict, current: dict) -> dict:
    """Wrap each seam attribute with a counter (per current["mode"]); returns the originals to restore."""
    from h1tune.ssm import seam

    module = seam._falcon_module()
    bindings = _bindings()
    saved = {}
    for name, (package, bound_real) in bindings.items():
        fn = getattr(module, name)
        saved[name] = fn

        def counted(*args, __fn=fn, __name=name, __real=bound_real, __pkg=package, **kwargs):
            out = __fn(*args, **kwargs)
            who = _handler(__fn, __real, args, kwargs)
            calls[current["mode"]][(__name, f"{__pkg} ({who})" if who == REAL else who, out is None)] += 1
            return out

        setattr(module, name, counted)
    return saved


def _profiler_works(device: str) -> bool:
    """Whether the CUDA profiler runs here (CUPTI can be missing in a sandbox; call counts still tell)."""
    if device != "cuda":
        return False
    import torch
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]):
            torch.ones(1, device="cuda").add_(1)
        return True
    except RuntimeError:
        return False


def _profiled(enabled: bool, fn) -> list[str] | None:
    """Run fn; with the profiler, return the Mamba-looking GPU kernel names it saw (None: not profiled)."""
    if not enabled:
        fn()
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if any(h in n for h in KERNEL_NAME_HINTS))


def _modes(model, ids, device: str) -> dict:
    """mode -> a function running it once: train (forward + backward), eval (forward), generate (4 tokens)."""
    import torch

    def train():
        model.train()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()

    def evaluate():
        model.eval()
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    def generate():
        model.eval()
        model.generate(input_ids=ids[:1, :24], attention_mask=torch.ones_like(ids[:1, :24]), max_new_tokens=4,
                       do_sample=False, pad_token_id=0)

    return {"train": train, "eval": evaluate, "generate": generate}


def run(ctx: Ctx) -> StepResult:
    import torch

    from h1tune import ssm
    from h1tune.model import mamba_path
    from h1tune.presets import build_model

    ssm.install()  # what load_model does for every h1tune run
    # Two layers of the 0.5B shape on a GPU: the Triton kernels compile and autotune here for the
    # shapes and dtype steps 2, 4 and 5 use, and later steps reuse Triton's on-disk caches.
    model = build_model(ctx.preset, num_hidden_layers=2).to(device=ctx.device, dtype=getattr(torch, ctx.dtype))
    ids = torch.randint(5, 1000, (2, 96), generator=torch.Generator().manual_seed(0)).to(ctx.device)
    calls: dict = collections.defaultdict(collections.Counter)
    current = {"mode": None}
    saved = _install_counters(calls, current)
    kernels_seen, seconds = {}, {}
    profiling = _profiler_works(ctx.device)
    try:
        for mode, fn in _modes(model, ids, ctx.device).items():
            current["mode"] = mode
            start = time.perf_counter()
            kernels_seen[mode] = _profiled(profiling, fn)
            seconds[mode] = time.perf_counter() - start
    finally:
        from h1tune.ssm import seam

        for name, fn in saved.items():
            setattr(seam._falcon_module(), name, fn)
    result = _verdict(ctx, calls, kernels_seen, mamba_path(), _bindings())
    result.data["first_call_seconds"] = seconds
    result.notes.append("first call of each mode (Triton compiles and autotunes here on a GPU): "
                        + ", ".join(f"{m} {s:.1f}s" for m, s in seconds.items()))
    return result


def _verdict(ctx: Ctx, calls: dict, kernels_seen: dict, path: str, bindings: dict) -> StepResult:
    want = REAL if ctx.cuda else OURS
    rows, problems, summary = [], [], []
    for mode, counter in calls.items():
        handled = sorted({who for (_, who, _) in counter})
        fused = [n for (n, who, none) in counter if n.endswith("split_conv1d_scan_combined") and not none]
        for (name, who, returned_none), count in sorted(counter.items()):
            rows.append([mode, name, count, who, "None (unfused path follows)" if returned_none else "output"])
            if want not in who:
                problems.append(f"{mode}: {name} handled by {who}, expected the {want}")
        if ctx.cuda and mode == "train" and not fused:
            problems.append("train: the fused mamba_split_conv1d_scan_combined did not produce the mixer output")
        summary.append(f"{mode}: {'fused kernel' if fused else ' + '.join(handled)}")
    if ctx.cuda and "fused" not in path:
        problems.append(f"h1tune.model.mamba_path() says {path!r} on CUDA")
    if not ctx.cuda and "h1tune" not in path:
        problems.append(f"h1tune.model.mamba_path() says {path!r}, expected h1tune's torch path on CPU")
    notes = [f"h1tune.model.mamba_path(): {path}",
             "transformers bound: " + ", ".join(f"{n} -> {'package ' + p if real else 'torch'}"
                                                for n, (p, real) in bindings.items())]
    notes += [f"CUDA kernels seen in {mode}: " + ("profiler unavailable here" if k is None else ", ".join(k) or "none")
              for mode, k in kernels_seen.items() if ctx.cuda]
    if not ctx.cuda:
        notes.append("dry run: no CUDA, so h1tune's dispatcher keeps every call on its torch kernels (expected)")
    notes += [f"PROBLEM: {p}" for p in problems]
    data = {"mamba_path": path, "bindings": {n: {"package": p, "bound_real": r} for n, (p, r) in bindings.items()},
            "calls": {m: [{"function": n, "handled_by": w, "returned_none": z, "count": c}
                          for (n, w, z), c in counter.items()] for m, counter in calls.items()},
            "kernels_seen": kernels_seen}
    return StepResult(not problems, "; ".join(summary), ["mode", "seam function", "calls", "handled by", "returned"],
                      rows, data, notes)
