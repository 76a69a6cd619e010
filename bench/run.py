"""h1tune's speed and memory benchmarks in one command: every table, then a summary; JSON to --out.

    .venv/bin/python bench/run.py [--out bench-results.json] [--quick]

About 10 minutes on a 2-core CPU (--quick: the tiny-model parts only, ~3 minutes). Each part is its
own script (run it alone for more options) in its own fresh processes, one after another: run this
on an otherwise idle machine, since two processes of 2 OpenMP threads slow each other 3-5x.
  1. seq_scaling.py     step time vs packed length (512-4096), fitted exponent, FLOP/s vs the GEMM peak
  2. whole_process.py   `h1tune train` vs a TRL SFTTrainer + peft script, launch -> saved adapter
  3. sft_throughput.py  in-loop effective tokens/s: h1tune packed / padded vs TRL padded
  4. laptop_epoch.py    the 0.5B-shape LoRA epoch over 999 Alpaca rows, predicted from a few steps
  5. memory_step.py     peak RSS of one 0.5B-shape LoRA step at 2,048 tokens, h1tune vs TRL
Data: ../shared/data/real/alpaca_en_demo.json beside the checkout (parts 2-4).
The header names the CPU, the GEMM peaks measured at the start and the precision `dtype: auto` chose:
every ratio below is only comparable between runs on the same CPU kind and precision.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent

PARTS = [  # (name, script, arguments, in --quick)
    ("seq_scaling", "seq_scaling.py", [], True),
    ("whole_process", "whole_process.py", ["--rows", "128", "--batch-size", "8", "--modes", "h1tune,trl"], True),
    ("sft_throughput", "sft_throughput.py", ["--rows", "128", "--holdout", "16", "--batch-size", "8"], True),
    ("laptop_epoch", "laptop_epoch.py", ["--steps", "3"], False),
    ("memory_step", "memory_step.py", [], False),
]


def summary(results: dict) -> list[str]:
    """The headline numbers of whichever parts ran."""
    lines = []
    if "seq_scaling" in results:
        r = results["seq_scaling"]
        shares = [row["share_of_fp32_gemm_peak"] for row in r["rows"]]
        lines.append(f"step time ~ packed length^{r['exponent']:.2f} (tiny); model FLOP/s {min(shares):.0%}-"
                     f"{max(shares):.0%} of the fp32 GEMM peak ({r['fp32_gemm_gflops']:.0f} GFLOP/s)")
    if "whole_process" in results:
        r = results["whole_process"]["results"]
        lines.append(f"whole process (tiny, 128 rows): h1tune {r['h1tune']['wall_s']:.1f} s vs TRL defaults "
                     f"{r['trl']['wall_s']:.1f} s = {r['trl']['wall_s'] / r['h1tune']['wall_s']:.2f}x")
    if "sft_throughput" in results:
        r = results["sft_throughput"]["results"]
        rate = {mode: v["effective_tokens"] / v["train_s"] for mode, v in r.items()}
        if "trl-padded" in rate:
            lines.append("in-loop effective tokens/s vs TRL padded: " + ", ".join(
                f"{mode} {rate[mode] / rate['trl-padded']:.2f}x" for mode in rate if mode != "trl-padded"))
    if "laptop_epoch" in results:
        r = results["laptop_epoch"]
        lines.append(f"laptop epoch (0.5B shape, 999 rows): {r['median_step_s']:.1f} s/step x {r['steps']} steps = "
                     f"{r['predicted_minutes']:.0f} min predicted; peak RSS {r['peak_rss_gib']:.1f} GiB")
    if "memory_step" in results:
        r = results["memory_step"]["results"]
        lines.append(f"peak RSS, 0.5B LoRA step at 2,048 tokens: h1tune {r['h1tune']['peak_rss_gib']:.2f} GiB vs TRL "
                     f"{r['trl']['peak_rss_gib']:.2f} GiB = {r['h1tune']['peak_rss_gib'] / r['trl']['peak_rss_gib']:.2f}x")
    return lines


def machine() -> dict:
    """The CPU, its fp32/bf16 GEMM peaks measured now, and what `model.dtype: auto` chooses on it (and why)."""
    from h1tune.config import load_config
    from h1tune.precision import cpu_model, gemm_speeds, training_precision

    fp32, bf16 = gemm_speeds()
    chosen = training_precision(load_config(None, ["model.name_or_path=tiny"]))
    return {"cpu": cpu_model(), "fp32_gemm_gflops": fp32, "bf16_gemm_gflops": bf16, "auto_precision": chosen.describe()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-results.json", help="where the combined JSON goes")
    parser.add_argument("--quick", action="store_true", help="only the tiny-model parts (1-3)")
    parser.add_argument("--only", help="comma-separated part names to run")
    args = parser.parse_args()
    chosen = [p for p in PARTS if (not args.quick or p[3]) and (not args.only or p[0] in args.only.split(","))]
    results, seconds = {}, {}
    cpu = machine()
    print(f"{cpu['cpu']}; GEMM peak measured now: fp32 {cpu['fp32_gemm_gflops']:.0f}, bf16 {cpu['bf16_gemm_gflops']:.0f} "
          f"GFLOP/s; dtype auto: {cpu['auto_precision']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, script, extra, _ in chosen:
            print(f"\n=== {name} ({script}) ===", flush=True)
            out = Path(tmp) / f"{name}.json"
            start = time.perf_counter()
            done = subprocess.run([sys.executable, str(BENCH / script), *extra, "--json", str(out)])
            seconds[name] = time.perf_counter() - start
            if done.returncode != 0 or not out.exists():
                print(f"{name} failed (exit {done.returncode}); continuing", flush=True)
                continue
            results[name] = json.loads(out.read_text())
    lines = [f"{cpu['cpu']}; GEMM peak fp32 {cpu['fp32_gemm_gflops']:.0f} / bf16 {cpu['bf16_gemm_gflops']:.0f} GFLOP/s; "
             f"dtype auto: {cpu['auto_precision']}", *summary(results)]
    print("\n=== summary ===\n" + "\n".join(lines))
    print("part seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    Path(args.out).write_text(json.dumps({"machine": cpu, "summary": lines, "seconds": seconds, "parts": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
