"""Time Falcon-H1's Mamba path on CPU: transformers' torch kernels vs h1tune's (`h1tune.ssm`).

    .venv/bin/python bench/profile_mamba.py                 # scan + one mixer, tiny and 0.5b shapes
    .venv/bin/python bench/profile_mamba.py --full-model    # also whole-model forward (0.5b: 2 GB, slow)

Prints best-of-N CPU milliseconds (process time, 1 thread by default) for forward and
forward+backward at batch 1 x 512, fp32.
"""

from __future__ import annotations

import argparse
import time


def best_ms(fn, reps: int) -> float:
    """Best CPU time of `reps` runs after a warm-up. CPU time, not wall: on a shared machine other
    jobs stretch wall time by 2-5x, while this process's CPU time barely moves (with 1 thread it is
    the wall time of a quiet machine)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best * 1e3


def scan_cases(config, length: int):
    """(name, fwd, fwd+bwd) thunks for the chunked scan alone, at the mixer's shapes."""
    import torch
    import transformers.models.falcon_h1.modeling_falcon_h1 as mf

    from h1tune.ssm import kernels

    g = torch.Generator().manual_seed(0)
    h, p, n, groups = config.mamba_n_heads, config.mamba_d_head, config.mamba_d_state, config.mamba_n_groups
    leaves = dict(
        x=torch.randn(1, length, h, p, generator=g), dt=torch.randn(1, length, h, generator=g),
        A=-torch.rand(h, generator=g) * 4, B=torch.randn(1, length, groups, n, generator=g),
        C=torch.randn(1, length, groups, n, generator=g),
    )
    for t in leaves.values():
        t.requires_grad_()
    extra = dict(D=torch.ones(h), dt_bias=torch.ones(h), dt_softplus=True, chunk_size=config.mamba_chunk_size)
    theirs = getattr(mf.mamba2_chunk_scan, "_h1tune_original", mf.mamba2_chunk_scan).__wrapped__
    for name, fn in (("transformers", theirs), ("h1tune", kernels.mamba_chunk_scan_combined)):
        def fwd(fn=fn):
            with torch.no_grad():
                fn(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], **extra)

        def fwd_bwd(fn=fn):
            fn(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], **extra).sum().backward()

        yield name, fwd, fwd_bwd


def module_cases(module, inputs: dict):
    """(name, fwd, fwd+bwd) thunks for a module with transformers' kernels, then with h1tune's."""
    import torch

    from h1tune import ssm

    for name, switch in (("transformers", ssm.uninstall), ("h1tune", ssm.install)):
        def fwd(switch=switch):
            switch()
            with torch.no_grad():
                module(**inputs)

        def fwd_bwd(switch=switch):
            switch()
            out = module(**inputs)
            (out.logits if hasattr(out, "logits") else out).float().pow(2).mean().backward()

        yield name, fwd, fwd_bwd


def run(presets: list[str], length: int, reps: int, full_model: bool) -> list[tuple]:
    import torch
    import transformers.models.falcon_h1.modeling_falcon_h1 as mf

    from h1tune.presets import build_model, preset_config

    rows = []
    for preset in presets:
        config = preset_config(preset)
        for name, fwd, fwd_bwd in scan_cases(config, length):
            rows.append((preset, "chunk scan", name, best_ms(fwd, reps), best_ms(fwd_bwd, reps)))

        torch.manual_seed(0)
        mixer = mf.FalconH1Mixer(config, layer_idx=0).float()
        mixer.register_buffer("mup_vector", mf.compute_mup_vector(config), persistent=False)
        hidden = torch.randn(1, length, config.hidden_size, requires_grad=True)
        for name, fwd, fwd_bwd in module_cases(mixer, {"hidden_states": hidden}):
            rows.append((preset, "mixer (1 layer)", name, best_ms(fwd, reps), best_ms(fwd_bwd, reps)))

        if full_model:
            model = build_model(preset)
            ids = torch.randint(5, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
            model_reps = max(2, reps // 5) if preset != "tiny" else reps
            for name, fwd, fwd_bwd in module_cases(model, {"input_ids": ids, "use_cache": False}):
                rows.append((preset, "whole model", name, best_ms(fwd, model_reps), best_ms(fwd_bwd, model_reps)))
            del model
    return rows


def print_table(rows: list[tuple], length: int, threads: int) -> None:
    print(f"batch 1 x {length}, fp32, CPU, {threads} thread(s); best-of-N CPU ms (process time)")
    print(f"{'shape':6} {'what':16} {'path':13} {'fwd ms':>9} {'fwd+bwd ms':>11} {'speed-up':>9}")
    base = {}
    for preset, what, name, fwd, fwd_bwd in rows:
        speedup = ""
        if name == "transformers":
            base[(preset, what)] = (fwd, fwd_bwd)
        else:
            f0, b0 = base[(preset, what)]
            speedup = f"{f0 / fwd:.2f}/{b0 / fwd_bwd:.2f}"
        print(f"{preset:6} {what:16} {name:13} {fwd:9.1f} {fwd_bwd:11.1f} {speedup:>9}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "0.5b"])
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU time sums over threads)")
    parser.add_argument("--full-model", action="store_true", help="also time the whole model (0.5b builds 2 GB)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()  # the "falling back to torch" warning is the point here
    print_table(run(args.presets, args.length, args.reps, args.full_model), args.length, torch.get_num_threads())


if __name__ == "__main__":
    main()
