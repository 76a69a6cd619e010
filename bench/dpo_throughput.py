"""DPO throughput, side by side: h1tune packed, h1tune padded, plain TRL DPOTrainer + peft (padded).

    .venv/bin/python bench/dpo_throughput.py --pairs 64 --max-length 512

The same first pairs of ../shared/data/real/dpo_en_demo.json (LLaMA-Factory's ShareGPT ranking
data), tiny preset, LoRA r16 on the safe targets, sigmoid loss, beta 0.1, fp32 on CPU, one epoch.
Each mode runs in its own process; "process s" is the whole process (imports, data, model, train),
"train s" the training loop; pairs are those kept after pairs whose prompt fills max_length are
dropped (both tools drop the same ones). TRL gets the pairs in its conversational form and
tokenizes them itself.
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
DPO_DEMO = REPO.parent / "shared/data/real/dpo_en_demo.json"
MODES = ("h1tune-packed", "h1tune-padded", "trl-padded")
SAFE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "gate_proj", "up_proj", "down_proj"]
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def _pairs(n: int) -> list[dict]:
    return json.loads(DPO_DEMO.read_text())[:n]


def run_h1tune(args, packed: bool, work: Path) -> dict:
    from h1tune.config import load_config
    from h1tune.train.run import run_training

    (work / "pairs.json").write_text(json.dumps(_pairs(args.pairs)))
    cfg = load_config(None, [
        "model.name_or_path=tiny", f"data.train={work / 'pairs.json'}", f"data.max_length={args.max_length}",
        f"data.packing={str(packed).lower()}", "adapter.lora_dropout=0.0", "adapter.probe=false",
        "training.objective=dpo", "training.recipe=dpo", "training.learning_rate=5e-5",
        f"training.per_device_train_batch_size={args.batch_size}", "training.num_train_epochs=1",
        "training.logging_steps=1", "training.save_steps=100000", "training.report_to=[none]",
        f"output_dir={work / 'run'}"])
    from h1tune.data.preference_prepare import prepare_preference_data
    from h1tune.model import load_tokenizer

    kept = len(prepare_preference_data(cfg.data, load_tokenizer(cfg.model), 42, "dpo").train)
    result = run_training(cfg)
    logged = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    tokens = max(r.get("num_tokens", 0) for r in logged)  # TRL's count of real (non-padding) tokens
    return {"steps": result.steps, "train_s": result.train_seconds, "loss": result.train_loss, "tokens": tokens,
            "pairs": kept}


def run_trl(args, work: Path) -> dict:
    """What TRL's docs lead a user to: DPOTrainer + peft_config on plain transformers, padded batches."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from h1tune.config import ModelConfig
    from h1tune.model import load_tokenizer, resolve_model_path

    def conversational(row):
        prompt = [{"role": ROLES[t["from"]], "content": t["value"]} for t in row["conversations"]]
        return {"prompt": prompt, "chosen": [{"role": "assistant", "content": row["chosen"]["value"]}],
                "rejected": [{"role": "assistant", "content": row["rejected"]["value"]}]}

    tokenizer = load_tokenizer(ModelConfig(name_or_path="tiny"))
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny"), dtype=torch.float32)
    config = DPOConfig(output_dir=str(work / "trl"), max_length=args.max_length, per_device_train_batch_size=args.batch_size,
                       num_train_epochs=1, learning_rate=5e-5, lr_scheduler_type="cosine", warmup_steps=0.1,
                       beta=0.1, loss_type=["sigmoid"], logging_steps=1, save_strategy="no", report_to=[],
                       use_cpu=True, bf16=False, gradient_checkpointing=False, seed=42)
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=SAFE_TARGETS, task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=config, processing_class=tokenizer, peft_config=peft_config,
                         train_dataset=Dataset.from_list([conversational(r) for r in _pairs(args.pairs)]))
    start = time.perf_counter()
    output = trainer.train()
    tokens = max(h.get("num_tokens", 0) for h in trainer.state.log_history)
    return {"steps": trainer.state.global_step, "train_s": time.perf_counter() - start, "loss": output.training_loss,
            "tokens": tokens, "pairs": len(trainer.train_dataset)}  # after TRL drops prompts that fill max_length


def child(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = run_trl(args, Path(tmp)) if args.mode == "trl-padded" else run_h1tune(args, args.mode == "h1tune-packed",
                                                                                    Path(tmp))
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=64, help="first pairs of dpo_en_demo.json (one epoch)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not DPO_DEMO.is_file():
        sys.exit("dpo_en_demo.json not found under ../shared/data/real/")
    if args.mode:
        return child(args)
    results = {}
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--mode", mode, "--pairs", str(args.pairs), "--max-length",
               str(args.max_length), "--batch-size", str(args.batch_size)]
        print(f"running {mode} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        process_s = time.perf_counter() - started
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
        results[mode] = {**json.loads(line[7:]), "process_s": process_s}
    print(f"\nDPO on the first {args.pairs} pairs of dpo_en_demo.json, preset tiny, LoRA r16, sigmoid beta 0.1, fp32 "
          f"CPU, max_length {args.max_length}, batch {args.batch_size} pairs, threads "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')}")
    head = (f"{'mode':<15}{'pairs':>6}{'steps':>6}{'tokens':>8}{'process s':>10}{'pairs/s':>9}{'train s':>9}"
            f"{'train pairs/s':>14}{'peak RSS MB':>12}")
    print(head)
    print("-" * len(head))
    for mode, r in results.items():
        print(f"{mode:<15}{r['pairs']:>6}{r['steps']:>6}{r['tokens']:>8,.0f}{r['process_s']:>10.1f}"
              f"{r['pairs'] / r['process_s']:>9.2f}{r['train_s']:>9.1f}{r['pairs'] / r['train_s']:>14.2f}"
              f"{r['peak_rss_mb']:>12,.0f}")
    if "trl-padded" in results:
        base = results["trl-padded"]
        for mode in ("h1tune-packed", "h1tune-padded"):
            if mode in results:
                print(f"{mode} vs trl-padded: {base['process_s'] / results[mode]['process_s']:.2f}x whole process, "
                      f"{base['train_s'] / results[mode]['train_s']:.2f}x training loop")


if __name__ == "__main__":
    main()
