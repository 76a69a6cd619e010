"""SFT throughput, side by side in one run: h1tune packed, h1tune padded, plain TRL SFTTrainer + peft.

    .venv/bin/python bench/sft_throughput.py --preset tiny --rows 400
    .venv/bin/python bench/sft_throughput.py --preset 0.5b --rows 24

Same rows of ../shared/data/real/alpaca_en_demo.json, same LoRA (r 16, the seed guide's safe
targets), fp32 on CPU, one epoch, so every mode trains on the same tokens. Each mode runs in its
own process (peak RSS is per process). Effective tokens/s counts the tokens that carry loss.
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
ALPACA = REPO.parent / "shared/data/real/alpaca_en_demo.json"  # ../shared beside the checkout
ALPACA = ALPACA if ALPACA.is_file() else None
MODES = ("h1tune-packed", "h1tune-padded", "trl-padded")
SAFE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "gate_proj", "up_proj", "down_proj"]


def _rows(n: int, holdout: int) -> tuple[list[dict], list[dict]]:
    rows = json.loads(ALPACA.read_text())
    return rows[:n], rows[n:n + holdout]


def _as_messages(row: dict) -> list[dict]:
    prompt = row["instruction"] + ("\n" + row["input"] if row.get("input") else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def run_h1tune(args, packed: bool, work: Path) -> dict:
    from h1tune.config import load_config
    from h1tune.data import prepare_datasets
    from h1tune.model import load_tokenizer
    from h1tune.train.run import run_training

    train, held = _rows(args.rows, args.holdout)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held)):
        (work / name).write_text("".join(json.dumps({"messages": _as_messages(r)}) + "\n" for r in rows))
    cfg = load_config(None, [
        f"model.name_or_path={args.preset}", f"data.train={work / 'train.jsonl'}", f"data.eval={work / 'eval.jsonl'}",
        f"data.max_length={args.max_length}", f"data.packing={str(packed).lower()}", "data.truncation=truncate",
        "adapter.lora_dropout=0.0", "adapter.probe=false", f"adapter.target_modules={json.dumps(['attention', 'mamba', 'mlp'])}",
        "training.learning_rate=2e-4", f"training.per_device_train_batch_size={args.batch_size}",
        "training.num_train_epochs=1", "training.logging_steps=1", "training.save_steps=100000",
        f"training.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
        "training.report_to=[none]", f"output_dir={work / 'run'}"])
    effective = sum(sum(1 for t in e["labels"][1:] if t != -100)
                    for e in prepare_datasets(cfg.data, load_tokenizer(cfg.model), seed=42).train)
    start = time.perf_counter()
    result = run_training(cfg)
    wall = time.perf_counter() - start
    return {"steps": result.steps, "effective_tokens": effective, "wall_s": wall,
            "train_s": result.train_seconds, "final_loss": result.eval_metrics.get("eval_loss")}


def run_trl(args, work: Path) -> dict:
    """What the seed's guide leads a user to: SFTTrainer + peft, padded batches, safe targets."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from transformers import AutoModelForCausalLM

    from h1tune.config import ModelConfig
    from h1tune.data import pad_collate
    from h1tune.model import load_tokenizer, resolve_model_path
    from h1tune.lm.loss import token_loss_sum

    train, held = _rows(args.rows, args.holdout)
    to_pc = lambda r: {"prompt": _as_messages(r)[:1], "completion": _as_messages(r)[1:]}  # noqa: E731
    model_cfg = ModelConfig(name_or_path=args.preset)
    tokenizer = load_tokenizer(model_cfg)
    # Plain transformers, as a TRL user has it (h1tune's load_model would install h1tune's Mamba kernels).
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.preset), dtype=torch.float32)
    config = SFTConfig(output_dir=str(work / "trl"), max_length=args.max_length, per_device_train_batch_size=args.batch_size,
                       num_train_epochs=1, learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03,
                       logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                       gradient_checkpointing=args.gradient_checkpointing, seed=42)
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=SAFE_TARGETS, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list([to_pc(r) for r in train]),
                         processing_class=tokenizer, peft_config=peft_config)
    effective = sum(sum(1 for t in labels[1:] if t != -100) for labels in trainer.train_dataset["labels"])
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    # The same token-weighted held-out loss h1tune reports, on the same held-out rows.
    from h1tune.config import DataConfig
    from h1tune.data import prepare_datasets

    (work / "eval.jsonl").write_text("".join(json.dumps({"messages": _as_messages(r)}) + "\n" for r in held))
    eval_rows = prepare_datasets(DataConfig(train=[str(work / "eval.jsonl")], max_length=args.max_length),
                                 tokenizer, seed=42).train
    trainer.model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(eval_rows), 8):
            loss, n = token_loss_sum(trainer.model, pad_collate(eval_rows[i:i + 8], tokenizer.pad_token_id))
            total, count = total + loss.item(), count + n
    return {"steps": trainer.state.global_step, "effective_tokens": int(effective), "wall_s": train_s,
            "train_s": train_s, "final_loss": total / max(count, 1)}


def child(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.mode == "trl-padded":
            out = run_trl(args, work)
        else:
            out = run_h1tune(args, args.mode == "h1tune-packed", work)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--rows", type=int, default=400, help="alpaca rows to train on (one epoch)")
    parser.add_argument("--holdout", type=int, default=32, help="rows after them for the final held-out loss")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if ALPACA is None:
        sys.exit("alpaca_en_demo.json not found under ../shared/data/real/")
    if args.mode:
        return child(args)
    results = {}
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--mode", mode, "--preset", args.preset, "--rows", str(args.rows),
               "--holdout", str(args.holdout), "--max-length", str(args.max_length), "--batch-size", str(args.batch_size)]
        if args.gradient_checkpointing:
            cmd.append("--gradient-checkpointing")
        print(f"running {mode} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
        results[mode] = json.loads(line[7:])
    print(f"\nSFT on {args.rows} alpaca rows, preset {args.preset}, LoRA r16, fp32 CPU, max_length {args.max_length}, "
          f"batch {args.batch_size}, threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    head = f"{'mode':<15}{'steps':>6}{'eff. tokens':>12}{'train s':>9}{'eff. tok/s':>11}{'peak RSS MB':>12}{'held-out loss':>14}"
    print(head)
    print("-" * len(head))
    for mode, r in results.items():
        seconds = r["train_s"]
        print(f"{mode:<15}{r['steps']:>6}{r['effective_tokens']:>12,}{seconds:>9.1f}{r['effective_tokens'] / seconds:>11,.0f}"
              f"{r['peak_rss_mb']:>12,.0f}{r['final_loss']:>14.4f}")
    if "trl-padded" in results:
        base = results["trl-padded"]
        base_rate = base["effective_tokens"] / base["train_s"]
        for mode in ("h1tune-packed", "h1tune-padded"):
            if mode in results:
                r = results[mode]
                rate = r["effective_tokens"] / r["train_s"]
                print(f"{mode} vs trl-padded: {rate / base_rate:.2f}x effective tokens/s, "
                      f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x peak RSS")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "mode"},
                                               "results": results}, indent=1))


if __name__ == "__main__":
    main()
