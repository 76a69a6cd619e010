"""Context parallelism: memory per rank and step time, one process on the whole row vs 2 ranks (CP 2).

    .venv/bin/python bench/context_parallel.py --measure --preset tiny --lengths 8192,16384,32768
    .venv/bin/python bench/context_parallel.py --table        # computed: every published shape, CP 1..8

--measure: one LoRA r16 forward+backward over one packed row of --doc-token documents (fp32, h1tune's
training path: kernels, chunked loss, no checkpointing), the median of --repeats steps after a warm-up;
first in one process (all threads), then in two gloo processes on halves of the row (one thread each:
the same cores). Each process's peak RSS is its own (ru_maxrss). On one machine CP shows the memory
per rank and the cost of the exchange, not a speed-up: the cores are the same.
--table: h1tune's memory plan (train/memory.py, the estimate `h1tune train` prints) for a rank's slice,
LoRA r16, bf16 activations, gradient checkpointing on, plus one layer's gathered keys and values;
COMPUTED on the meta device, not measured.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

GiB = 2**30


def _model(preset: str):
    from h1tune import ssm
    from h1tune.adapters import apply_adapter
    from h1tune.config import load_config
    from h1tune.model import load_model

    cfg = load_config(None, [f"model.name_or_path={preset}", "model.dtype=float32", "adapter.probe=false"])
    model = apply_adapter(load_model(cfg.model, announce=False), cfg).train()
    ssm.install()
    return model


def _row(length: int, doc: int):
    import torch

    from h1tune.data.packing import collate_packed

    gen = torch.Generator().manual_seed(length)
    sizes = [doc] * (length // doc) + ([length % doc] if length % doc else [])
    return collate_packed([{"input_ids": torch.randint(5, 1000, (n,), generator=gen).tolist()} for n in sizes])


def _step(model, batch, group=None, rank=0, size=1) -> float:
    import contextlib

    from h1tune import context_parallel as cp
    from h1tune.lm.loss import chunked_lm_loss, final_hidden_states

    inner = model.get_base_model()
    start = time.perf_counter()
    mine = cp.split_packed_batch(batch, size)[rank]
    with cp.enabled(group, model=inner) if group is not None else contextlib.nullcontext():
        hidden = final_hidden_states(model, inner, input_ids=mine["input_ids"], position_ids=mine["position_ids"],
                                     seq_idx=mine["seq_idx"])
        total, _ = chunked_lm_loss(hidden, mine["shift_labels"], inner.lm_head, inner.model.lm_head_multiplier,
                                   shifted=True)
        (total / mine["num_items_in_batch"]).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _timed(model, batch, repeats, **kw) -> float:
    _step(model, batch, **kw)
    return statistics.median(_step(model, batch, **kw) for _ in range(repeats))


def _rank(rank: int, args, init: str, out: str) -> None:
    import json

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    from h1tune.precision import flush_denormals, keep_freed_memory

    flush_denormals()
    keep_freed_memory()
    model = _model(args.preset)
    seconds = _timed(model, _row(args.length, args.doc), args.repeats, group=dist.group.WORLD, rank=rank, size=2)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"step_s": seconds, "peak_gib": peak}, f)
    dist.destroy_process_group()


def measure_one(args) -> None:
    """Run in a fresh process per (length, mode) so each peak RSS is that run's alone."""
    import json
    import tempfile

    if args.mode == "whole":
        from h1tune.precision import flush_denormals, keep_freed_memory

        flush_denormals()
        keep_freed_memory()
        seconds = _timed(_model(args.preset), _row(args.length, args.doc), args.repeats)
        print(json.dumps({"step_s": seconds, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
        return
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(args, os.path.join(tmp, "init"), os.path.join(tmp, "out")), nprocs=2, join=True)
        ranks = [json.load(open(os.path.join(tmp, f"out.{r}"))) for r in (0, 1)]
    print(json.dumps({"step_s": max(r["step_s"] for r in ranks), "peak_gib": max(r["peak_gib"] for r in ranks)}))


def measure(args) -> None:
    import json
    import subprocess
    import sys

    from h1tune.precision import cpu_model

    print(f"context parallelism, measured: preset {args.preset}, LoRA r16, fp32, {args.doc}-token documents, one "
          f"row; {cpu_model()}; 1 process (2 threads) vs CP 2 (2 processes x 1 thread)")
    head = f"{'length':>7}{'CP1 step s':>12}{'CP1 peak GiB':>14}{'CP2 step s':>12}{'CP2 peak GiB/rank':>19}"
    print(head + "\n" + "-" * len(head))
    for length in [int(x) for x in args.lengths.split(",")]:
        got = {}
        for mode in ("whole", "cp2"):
            out = subprocess.run([sys.executable, __file__, "--one", mode, "--preset", args.preset, "--doc",
                                  str(args.doc), "--repeats", str(args.repeats), "--length", str(length)],
                                 capture_output=True, text=True, check=True)
            got[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{length:>7}{got['whole']['step_s']:>12.2f}{got['whole']['peak_gib']:>14.2f}"
              f"{got['cp2']['step_s']:>12.2f}{got['cp2']['peak_gib']:>19.2f}")


def table(args) -> None:
    import torch
    from memory_table import census  # bench/memory_table.py: LoRA parameters on h1tune's default targets

    from h1tune.presets import build_model
    from h1tune.train.memory import estimate_bytes

    sizes = {"0.5B": "0.5b", "1.5B": "1.5b", "7B": "7b", "34B": "34b"}
    lengths, groups = (32768, 131072, 262144), (1, 2, 4, 8)
    print("GiB per rank, LoRA r16, bf16 weights and activations, gradient checkpointing on, one row of L tokens "
          "split over CP ranks (COMPUTED: h1tune's memory plan + one layer's gathered K/V)")
    print("| size | L | " + " | ".join(f"CP {g}" for g in groups) + " |\n|---|---|" + "---|" * len(groups))
    for name, preset in sizes.items():
        model = build_model(preset, device="meta").to(dtype=torch.bfloat16).requires_grad_(False)  # the frozen base
        adapter = census(model, 16).lora * (4 + 4 + 8)  # LoRA r16 on the default targets: fp32 weight, grad, Adam
        c = model.config
        kv = 2 * c.num_key_value_heads * (c.head_dim or c.hidden_size // c.num_attention_heads) * 2  # K+V, bf16
        for length in lengths:
            cells = [(estimate_bytes(model, length // g, True, 2, logit_tokens=1024) + adapter + length * kv) / GiB
                     for g in groups]
            print(f"| {name} | {length // 1024}K | " + " | ".join(f"{x:.1f}" for x in cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", action="store_true")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--lengths", default="8192,16384")
    parser.add_argument("--doc", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--one", choices=("whole", "cp2"), dest="mode", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        measure_one(args)
    elif args.table:
        table(args)
    else:
        measure(args)


if __name__ == "__main__":
    main()
