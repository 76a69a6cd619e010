"""One GRPO step split into generation and training, and the whole command against TRL + peft.

    .venv/bin/python bench/grpo_throughput.py                  # tiny preset, arithmetic prompts, 6 steps
    .venv/bin/python bench/grpo_throughput.py --steps 10 --repeat 2

Both sides train the same LoRA (r 16 on h1tune's default targets: attention, Mamba in_proj, MLP) on
the same prompts and rewards (math_answer + 0.2 think_format) with the same group size, completion
length and batch: h1tune through `h1tune train examples/grpo_arithmetic.yaml`, TRL through its
`GRPOTrainer` with a peft LoraConfig and its defaults otherwise (bf16 autocast where h1tune's `auto`
chose it, fp32 elsewhere). Whole commands run in fresh processes, alternating, launch to saved
adapter; h1tune's per-step split comes from its metrics.jsonl (`timing/generation_s`, `step_time`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "grpo_arithmetic.yaml"

TRL_SCRIPT = r'''
import sys, torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer
from h1tune.rewards import math_answer, think_format
import json
model_dir, data, out, steps, bf16 = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
rows = [json.loads(l) for l in open(data)]
rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(model_dir)
args = GRPOConfig(output_dir=out, use_cpu=True, bf16=bf16, num_generations=4, max_completion_length=48,
                  per_device_train_batch_size=8, max_steps=steps, logging_steps=1, save_strategy="no",
                  report_to=[], reward_weights=[1.0, 0.2], seed=42)
lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "in_proj",
                                                      "gate_proj", "up_proj", "down_proj"])
trainer = GRPOTrainer(model=model, reward_funcs=[math_answer, think_format], args=args,
                      train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=lora)
trainer.train()
trainer.save_model(out + "/final")
'''


def run(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args()
    from h1tune.config import load_config
    from h1tune.precision import cpu_model, training_precision
    from h1tune.presets import cached_preset

    bf16 = training_precision(load_config(EXAMPLE)).autocast
    model_dir = cached_preset("tiny")
    data = REPO / "src" / "h1tune" / "resources" / "grpo_arithmetic.jsonl"
    times: dict[str, list[float]] = {"h1tune": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            times["h1tune"].append(run([sys.executable, "-m", "h1tune.cli", "train", str(EXAMPLE), "--overwrite",
                                        "--set", f"training.max_steps={args.steps}", "--set", f"output_dir={tmp}/h1",
                                        "--set", f"model.name_or_path={model_dir}", "--set", "training.report_to=[none]"]))
            times["trl"].append(run([sys.executable, "-c", TRL_SCRIPT, str(model_dir), str(data), f"{tmp}/trl",
                                     str(args.steps), "1" if bf16 else "0"]))
        steps = [json.loads(line) for line in (Path(tmp) / "h1" / "metrics.jsonl").read_text().splitlines()]
    steady = [s for s in steps if "step_time" in s][1:]  # the first step carries warm-up
    gen = statistics.median(s["timing/generation_s"] for s in steady)
    step = statistics.median(s["step_time"] for s in steady)
    h1, trl = statistics.median(times["h1tune"]), statistics.median(times["trl"])
    print(f"GRPO, tiny preset, LoRA r16, 4 completions x 2 prompts per step, <=48 tokens, {args.steps} steps; "
          f"{'bf16 autocast' if bf16 else 'fp32'} ({cpu_model()})")
    print(f"h1tune step (median of steps 2..): {step:.2f} s = generation {gen:.2f} s ({gen / step:.0%}) + "
          f"training and scoring {step - gen:.2f} s")
    print(f"{'whole command':<16}{'h1tune s':>10}{'TRL+peft s':>12}{'ratio':>8}")
    print(f"{'launch to save':<16}{h1:>10.1f}{trl:>12.1f}{trl / h1:>8.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"h1tune_s": times["h1tune"], "trl_s": times["trl"], "step_s": step,
                                               "generation_s": gen, "bf16": bf16}, indent=1))


if __name__ == "__main__":
    main()
