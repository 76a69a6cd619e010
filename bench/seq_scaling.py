"""Step time vs packed sequence length, with the fitted exponent and model FLOP/s vs the GEMM peak.

    .venv/bin/python bench/seq_scaling.py [--preset tiny] [--lengths 512,1024,2048,4096] [--json out.json]
    .venv/bin/python bench/seq_scaling.py --lengths 1024,2048,4096,8192,16384,32768 --doc 0   # one long trace per row

One LoRA r16 forward + chunked loss + backward over one packed row of --doc-token documents per
length (--doc 0: the whole row is one document, as a long reasoning trace is: its attention is then
quadratic in the length and shows in the exponent, while packed short documents stay linear), through h1tune's own training path (its kernels, per-document attention, chunked loss, subnormals
flushed), fp32,
no gradient checkpointing; the median of --repeats steps after --warmup steps. Each length runs in a process
of its own, as a run at that length would: its peak RSS is its own, and no length inherits the heap
(and the page faults) another left (the first 32K step faults in ~10 GiB: 27 s, 20 s of it in the
kernel; the next ones take 15 s). The exponent b of
time ~ length^b is the least-squares slope in log-log: ~1 means the Mamba scan and per-document
attention keep the cost linear in tokens. Model FLOPs count a frozen-base LoRA step as 4 x
parameters x tokens (forward, and the input gradients of backward), the convention for MFU.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path


def packed_row(length: int, doc: int = 256):
    import torch

    sizes = [doc] * (length // doc) + ([length % doc] if length % doc else [])
    seq_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])[None].to(torch.int32)
    position_ids = torch.cat([torch.arange(n) for n in sizes])[None]
    ids = torch.randint(5, 1000, (1, length), generator=torch.Generator().manual_seed(length))
    return {"input_ids": ids, "position_ids": position_ids, "seq_idx": seq_idx}, ids


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--lengths", default="512,1024,2048,4096")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per length first")
    parser.add_argument("--doc", type=int, default=256, help="tokens per document in the row (0: one document)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--malloc-default", action="store_true",
                        help="leave glibc's allocator as it is (training keeps freed memory: precision.keep_freed_memory)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure this length, print JSON
    return parser.parse_args()


def measure(length: int, args: argparse.Namespace) -> dict:
    """One length, in this process: the step time, model FLOP/s and the process's peak RSS."""
    import resource

    from h1tune import ssm
    from h1tune.adapters import apply_adapter
    from h1tune.config import load_config
    from h1tune.lm.loss import chunked_lm_loss
    from h1tune.model import load_model
    from h1tune.precision import flush_denormals, keep_freed_memory

    cfg = load_config(None, [f"model.name_or_path={args.preset}", "model.dtype=float32", "adapter.probe=false"])
    model = apply_adapter(load_model(cfg.model, announce=False), cfg).train()
    ssm.install()
    flush_denormals()  # as training does
    kept = False if args.malloc_default else keep_freed_memory()
    inner = model.get_base_model()
    params = sum(p.numel() for p in inner.parameters())

    def step(inputs, labels) -> float:
        start = time.perf_counter()
        hidden = inner.model(**inputs, use_cache=False).last_hidden_state
        total, count = chunked_lm_loss(hidden, labels, inner.lm_head, inner.model.lm_head_multiplier)
        (total / count).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    inputs, labels = packed_row(length, args.doc or length)
    for _ in range(args.warmup):
        step(inputs, labels)
    seconds = statistics.median(step(inputs, labels) for _ in range(args.repeats))
    return {"length": length, "step_s": seconds, "tokens_per_s": length / seconds, "parameters": params,
            "model_gflops": 4 * params * length / seconds / 1e9, "freed_memory_kept": kept,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    args = parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    import subprocess
    import sys

    from h1tune.precision import cpu_model, gemm_speeds

    fp32_peak, _ = gemm_speeds()
    child = [sys.executable, __file__, "--preset", args.preset, "--repeats", str(args.repeats), "--warmup",
             str(args.warmup), "--doc", str(args.doc), *(["--malloc-default"] if args.malloc_default else [])]
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        out = subprocess.run([*child, "--one", str(length)], check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        row["share_of_fp32_gemm_peak"] = row["model_gflops"] / fp32_peak
        rows.append(row)
    params, kept = rows[0]["parameters"], rows[0]["freed_memory_kept"]
    xs, ys = [math.log(r["length"]) for r in rows], [math.log(r["step_s"]) for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    exponent = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)

    print(f"step time vs packed length: preset {args.preset} ({params / 1e6:.1f}M parameters), LoRA r16, fp32, "
          f"{f'{args.doc}-token documents' if args.doc else 'one document per row'}, batch 1; fp32 GEMM peak "
          f"measured {fp32_peak:.0f} GFLOP/s; {cpu_model()}; freed memory {'kept' if kept else 'returned (glibc default)'}")
    head = f"{'length':>7}{'step s':>9}{'tokens/s':>10}{'model GFLOP/s':>15}{'of GEMM peak':>14}{'peak RSS GiB':>14}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['length']:>7}{r['step_s']:>9.3f}{r['tokens_per_s']:>10,.0f}{r['model_gflops']:>15.1f}"
              f"{r['share_of_fp32_gemm_peak']:>14.0%}{r['peak_rss_gib']:>14.2f}")
    print(f"fitted: step time ~ length^{exponent:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "parameters": params, "fp32_gemm_gflops": fp32_peak,
                                               "doc": args.doc, "freed_memory_kept": kept, "rows": rows, "exponent": exponent}, indent=1))


if __name__ == "__main__":
    main()
