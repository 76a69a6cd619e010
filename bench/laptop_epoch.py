"""Predict the laptop epoch: one LoRA epoch of the 0.5B shape over all 999 Alpaca demo rows.

    .venv/bin/python bench/laptop_epoch.py [--steps 4] [--set model.dtype=float32]

Runs `h1tune train` as a new user would (preset 0.5b, packing on, max_length 1024, batch 2, LoRA
r16, every other setting default) for a few optimiser steps, then predicts the epoch from the
median time of the steps after the first (which pays for warm-up), times the number of packed
rows / batch. Prints the run's own memory decision and its peak RSS. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALPACA = REPO.parent / "shared/data/real/alpaca_en_demo.json"
H1TUNE = str(Path(sys.executable).with_name("h1tune"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="optimiser steps to time (the first is not counted)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    rows = json.loads(ALPACA.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "alpaca.json"
        data.write_text(json.dumps(rows))
        cmd = [H1TUNE, "train", str(REPO / "examples" / "quickstart.yaml"), "--overwrite",
               "--set", "model.name_or_path=0.5b", "--set", f"data.train={data}", "--set", "data.eval_fraction=0",
               "--set", "data.max_length=1024", "--set", "data.packing=true", "--set", "adapter.r=16",
               "--set", "adapter.lora_alpha=32", "--set", "adapter.lora_dropout=0.0", "--set", "training.recipe=lora",
               "--set", "training.learning_rate=2e-4", "--set", "training.num_train_epochs=1",
               "--set", "training.per_device_train_batch_size=2", "--set", f"training.max_steps={args.steps}",
               "--set", "training.logging_steps=1", "--set", "training.save_steps=100000",
               "--set", "training.eval_steps=100000", "--set", "training.report_to=[none]",
               "--set", f"output_dir={work / 'run'}", *[x for o in args.overrides for x in ("--set", o)]]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"})
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if status != 0:
            sys.exit(out[-4000:])
        metrics = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    times = [m["time"] for m in metrics if "loss" in m]
    step_seconds = [b - a for a, b in zip(times, times[1:])]
    packed = re.search(r"packing: (\d+) examples into (\d+) rows", out)
    steps = math.ceil(int(packed.group(2)) / 2)
    per_step = statistics.median(step_seconds)
    print("\n".join(line for line in out.splitlines()
                    if line.startswith(("h1tune: precision", "gradient checkpointing", "adapter probe", "time:",
                                        "h1tune: packing"))))
    print(f"\n0.5B shape, 999 alpaca rows -> {packed.group(2)} packed rows of 1024 -> {steps} steps at batch 2")
    print(f"measured: {len(step_seconds)} steps after the first, median {per_step:.1f} s/step "
          f"({', '.join(f'{s:.1f}' for s in step_seconds)}); this command {wall:.0f} s, peak RSS "
          f"{usage.ru_maxrss / 1024 / 1024:.1f} GiB")
    print(f"predicted epoch: {steps} x {per_step:.1f} s = {steps * per_step / 60:.0f} minutes (+ start-up, probe, saving)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "packed_rows": int(packed.group(2)), "steps": steps, "step_seconds": step_seconds, "median_step_s": per_step,
            "predicted_minutes": steps * per_step / 60, "command_s": wall, "peak_rss_gib": usage.ru_maxrss / 2**20,
            "tokens_per_step": 2 * 1024, "log": [line for line in out.splitlines() if line.startswith(("h1tune:", "time:"))]},
            indent=1))


if __name__ == "__main__":
    main()
