"""Reasoning SFT on long traces, on this CPU: whole `h1tune train` runs at max_length 16K / 32K.

    .venv/bin/python bench/long_trace_sft.py                                  # tiny, 16K and 32K
    .venv/bin/python bench/long_trace_sft.py --preset tiny-90m --lengths 16384 --docs-per-row 1

Each run trains 2 steps on rows that hold `--docs-per-row` conversations whose reasoning traces fill
the row (one document per row is one long trace: its attention is quadratic in the length), through
the real command: data summary, memory plan, probe, chunked loss, packing. It prints the memory
plan's decision, seconds per step (from metrics.jsonl's timestamps) and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_traces(path: Path, tokenizer, tokens: int, rows: int) -> None:
    """Conversations whose reasoning trace is about `tokens` tokens long (sentences of arithmetic)."""
    words, sentence = [], 0
    while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < tokens - 64:
        words += f"Step {sentence}: add {sentence % 7} to the total and check it again.".split()
        sentence += 1
    trace = " ".join(words)
    with path.open("w") as handle:
        for i in range(rows):
            handle.write(json.dumps({"messages": [
                {"role": "user", "content": f"Add the numbers of problem {i}."},
                {"role": "assistant", "content": f"The total is {i}.", "reasoning_content": trace}]}) + "\n")


def run(preset: str, length: int, docs_per_row: int, workdir: Path) -> dict:
    from h1tune.config import ModelConfig
    from h1tune.model import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=preset))
    data = workdir / f"traces-{length}.jsonl"
    write_traces(data, tokenizer, length // docs_per_row, rows=2 * docs_per_row)
    out = workdir / f"run-{preset}-{length}"
    config = {"model": {"name_or_path": preset}, "data": {"train": str(data), "max_length": length, "packing": True},
              "adapter": {"probe": True},
              "training": {"max_steps": 2, "per_device_train_batch_size": 1, "logging_steps": 1, "save_steps": 100,
                           "report_to": ["none"]}, "output_dir": str(out)}
    cfg_path = workdir / f"cfg-{length}.json"
    cfg_path.write_text(json.dumps(config))  # JSON is YAML
    cmd = [sys.executable, "-m", "h1tune.cli", "train", str(cfg_path), "--overwrite"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    whole = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # GiB (ru_maxrss is KiB on Linux)
    if proc.returncode:
        raise SystemExit(f"h1tune train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    plan = next((line for line in proc.stdout.splitlines() if line.startswith("gradient checkpointing")), "?")
    times = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [t for t in times if "loss" in t]
    seconds = [b["time"] - a["time"] for a, b in zip(steps, steps[1:])] if "time" in steps[0] else []
    return {"preset": preset, "max_length": length, "docs_per_row": docs_per_row, "plan": plan,
            "step_s": seconds[-1] if seconds else None, "whole_s": whole, "peak_rss_gib": peak,
            "loss": steps[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--lengths", default="16384,32768")
    parser.add_argument("--docs-per-row", type=int, default=1)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from h1tune.precision import cpu_model

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for length in (int(x) for x in args.lengths.split(",")):
            results.append(run(args.preset, length, args.docs_per_row, Path(tmp)))  # one at a time: RSS is the max so far
    print(f"long-trace SFT, {args.preset}, LoRA, packing, {args.docs_per_row} trace(s) per row; {cpu_model()}")
    print(f"{'max_length':>10}{'step s':>9}{'whole s':>9}{'peak RSS GiB':>14}  memory plan")
    for r in results:
        step = f"{r['step_s']:.1f}" if r["step_s"] is not None else "-"
        print(f"{r['max_length']:>10}{step:>9}{r['whole_s']:>9.1f}{r['peak_rss_gib']:>14.2f}  {r['plan']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
