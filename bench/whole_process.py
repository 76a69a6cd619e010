"""Whole commands, launch to saved adapter: `h1tune train` vs a plain TRL SFTTrainer + peft script.

    .venv/bin/python bench/whole_process.py --rows 128 --batch-size 8 --repeat 3   # tiny preset, Alpaca rows

What a user feels is the whole process: imports, data preparation, model loading, the probe,
the loop and saving. Each mode is a fresh process, run one after another on an otherwise idle
machine (never two at once: on 2 cores, two processes of 2 OpenMP threads slow each other 3-5x).
Modes: h1tune as a user runs it (dtype auto: bf16 on a CPU with native bf16, packing on), h1tune
forced to fp32, TRL with its defaults (bf16 autocast, gradient checkpointing), TRL forced to fp32.
Same rows of ../shared/data/real/alpaca_en_demo.json, same LoRA (r 16 on attention, Mamba in_proj,
MLP), max_length, batch size and one epoch. Peak RSS is the child's (wait4).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALPACA = REPO.parent / "shared/data/real/alpaca_en_demo.json"  # ../shared beside the checkout
H1TUNE = str(Path(sys.executable).with_name("h1tune"))
SAFE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "gate_proj", "up_proj", "down_proj"]

TRL_SCRIPT = '''
import json, sys
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

model_dir, data, out, max_length, batch, fp32 = sys.argv[1:7]
rows = [json.loads(line) for line in open(data)]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
extra = {"bf16": False} if fp32 == "1" else {}  # otherwise TRL's defaults: bf16 autocast, gradient checkpointing
config = SFTConfig(output_dir=out, max_length=int(max_length), per_device_train_batch_size=int(batch),
                   num_train_epochs=1, learning_rate=2e-4, logging_steps=10, save_strategy="no", report_to=[],
                   use_cpu=True, seed=42, **extra)
dataset = Dataset.from_list([{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in rows])
peft_config = LoraConfig(r=16, lora_alpha=32, target_modules=%r, task_type="CAUSAL_LM")  # peft default dropout 0
trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                     peft_config=peft_config)
trainer.train()
trainer.save_model(out + "/final")
''' % SAFE_TARGETS


def _messages(row: dict) -> list[dict]:
    prompt = row["instruction"] + ("\n" + row["input"] if row.get("input") else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def timed(cmd: list[str], env: dict) -> dict:
    """Wall seconds from launch to exit, the child's peak RSS, and its stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        sys.exit(f"{' '.join(cmd[:3])} failed:\n{out[-3000:]}")
    time_line = next((line for line in out.splitlines() if line.startswith("time: ")), "")
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "time_line": time_line}


def median_run(runs: list[dict]) -> dict:
    """The run with the median wall time (its own RSS and phase line), and every wall time."""
    ordered = sorted(runs, key=lambda r: r["wall_s"])
    return {**ordered[len(ordered) // 2], "walls": [round(r["wall_s"], 1) for r in runs]}


def prepare(work: Path, args) -> tuple[Path, Path, str]:
    """The data file, an h1tune config over it, and the preset's directory for the TRL script."""
    rows = json.loads(ALPACA.read_text())[: args.rows]
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": _messages(r)}) + "\n" for r in rows))
    config = {"model": {"name_or_path": args.preset}, "data": {"train": str(data), "max_length": args.max_length,
                                                               "packing": True},
              "adapter": {"r": 16, "lora_alpha": 32}, "training": {"per_device_train_batch_size": args.batch_size,
                                                                   "learning_rate": 2e-4, "report_to": ["none"],
                                                                   "save_steps": 100000},
              "output_dir": str(work / "h1tune")}
    import yaml

    (work / "h1tune.yaml").write_text(yaml.safe_dump(config))
    (work / "trl_sft.py").write_text(TRL_SCRIPT)
    from h1tune.model import resolve_model_path

    return work / "h1tune.yaml", data, resolve_model_path(args.preset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--modes", default="h1tune,h1tune-fp32,trl,trl-fp32")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of every mode; the table shows medians")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config, data, model_dir = prepare(work, args)
        commands = {
            "h1tune": [H1TUNE, "train", str(config), "--overwrite"],
            "h1tune-fp32": [H1TUNE, "train", str(config), "--overwrite", "--set", "model.dtype=float32"],
            "trl": [sys.executable, str(work / "trl_sft.py"), model_dir, str(data), str(work / "trl"),
                    str(args.max_length), str(args.batch_size), "0"],
            "trl-fp32": [sys.executable, str(work / "trl_sft.py"), model_dir, str(data), str(work / "trl"),
                         str(args.max_length), str(args.batch_size), "1"],
        }
        runs: dict[str, list[dict]] = {}
        for round_ in range(args.repeat):  # modes alternate, so a slow spell of the machine hits all of them
            for mode in args.modes.split(","):
                print(f"round {round_ + 1}/{args.repeat}: {mode} ...", file=sys.stderr, flush=True)
                runs.setdefault(mode, []).append(timed(commands[mode], env))
        results = {mode: median_run(rs) for mode, rs in runs.items()}
    print(f"\nwhole process, launch -> saved adapter: preset {args.preset}, {args.rows} alpaca rows, LoRA r16, "
          f"max_length {args.max_length}, batch {args.batch_size}, one epoch, threads "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')}")
    head = f"{'mode':<13}{'wall s':>8}{'peak RSS MB':>13}{'vs trl (defaults)':>19}{'vs trl-fp32':>13}"
    print(head + "\n" + "-" * len(head))
    for mode, r in results.items():
        vs = lambda base: f"{results[base]['wall_s'] / r['wall_s']:.2f}x" if base in results else "-"  # noqa: E731
        print(f"{mode:<13}{r['wall_s']:>8.1f}{r['peak_rss_mb']:>13,.0f}{vs('trl'):>19}{vs('trl-fp32'):>13}")
    for mode, r in results.items():
        print(f"{mode}: walls {r['walls']}" + (f"; median run's {r['time_line']}" if r["time_line"] else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
