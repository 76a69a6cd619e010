"""Step 4: SFT throughput, peak memory and MFU: h1tune packed vs h1tune padded vs TRL + peft padded.

Same Alpaca demo rows, same LoRA (r 16, alpha 32, dropout 0, h1tune's default targets resolved to
module names, which is what a TRL user lists), lr 2e-4, one epoch; the 0.5B shape in bf16 on a
GPU, the tiny preset in fp32 in the dry run. Each mode runs in its own process (`python -m
gpu_steps.throughput --mode ...`), so peak memory is its own: torch.cuda.max_memory_allocated on
a GPU, the process's peak RSS on CPU. A callback timestamps every optimizer step with the Trainer's
count of non-padding input tokens; steady-state rates leave out the first steps (Triton compiles
and autotunes there).

MFU = model FLOPs per token x steady non-padding tokens/s / the H200's dense bf16 peak (989.4
TFLOP/s, datasheet). Model FLOPs per token = 4 N_frozen + 6 N_lora: forward 2N and input
gradients 2N for every Linear (lm_head included, the embedding lookup excluded), weight gradients
2N only for the trainable LoRA weights; attention scores and the SSM scan are not counted, so MFU
is slightly understated. Padding tokens count for nothing: the padded modes pay for them in MFU.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from gpu_steps.common import H200_BF16_PEAK_TFLOPS, Ctx, StepResult, run_child, run_forked, write_result

MODES = ("h1tune-packed", "h1tune-padded", "trl-padded")
SIZES = {"cuda": {"rows": 256, "max_length": 512, "batch": 8, "warmup": 3},
         "cpu": {"rows": 8, "max_length": 128, "batch": 4, "warmup": 0}}
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}
LEARNING_RATE = 2e-4


def _as_messages(row: dict) -> list[dict]:
    prompt = row["instruction"] + ("\n" + row["input"] if row.get("input") else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def _step_clock():
    """A TrainerCallback recording (time, non-padding tokens seen) at every optimizer step."""
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.marks, self.params = [], {}

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            frozen = sum(m.weight.numel() for m in model.modules()
                         if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad)
            self.params = {"frozen_linear": frozen,
                           "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
            self.marks = [(time.perf_counter(), 0)]

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), int(state.num_input_tokens_seen)))

    return StepClock()


def _run_h1tune(cfg: dict, packed: bool, clock, work: Path) -> dict:
    from h1tune.config import load_config
    from h1tune.data import prepare_datasets
    from h1tune.model import load_tokenizer
    from h1tune.train import run_training

    run_cfg = load_config(None, [
        f"model.name_or_path={cfg['preset']}", f"model.dtype={cfg['dtype']}", f"data.train={cfg['alpaca_rows']}",
        f"data.max_length={cfg['max_length']}", f"data.packing={str(packed).lower()}", "data.truncation=truncate",
        "adapter.probe=false", *(f"adapter.{key}={value}" for key, value in LORA.items()),
        f"training.learning_rate={LEARNING_RATE}", f"training.per_device_train_batch_size={cfg['batch']}",
        "training.num_train_epochs=1", "training.logging_steps=10", "training.save_steps=100000",
        "training.report_to=[none]", f"output_dir={work / 'run'}"])
    prepared = prepare_datasets(run_cfg.data, load_tokenizer(run_cfg.model), seed=run_cfg.training.seed)
    effective = sum(sum(1 for t in e["labels"][1:] if t != -100) for e in prepared.train)
    result = run_training(run_cfg, callbacks=[clock])
    return {"steps": result.steps, "effective_tokens": effective, "train_loss": result.train_loss}


def _run_trl(cfg: dict, clock, work: Path, cuda: bool) -> dict:
    """What a TRL user runs: plain transformers (no h1tune seam), SFTTrainer + peft, padded batches."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from h1tune.adapters.lora import resolve_targets
    from h1tune.config import AdapterConfig, ModelConfig
    from h1tune.model import load_tokenizer, resolve_model_path

    rows = json.loads(Path(cfg["alpaca_rows"]).read_text())
    data = Dataset.from_list([{"prompt": _as_messages(r)[:1], "completion": _as_messages(r)[1:]} for r in rows])
    tokenizer = load_tokenizer(ModelConfig(name_or_path=cfg["preset"]))
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg["preset"]),
                                                 dtype=torch.bfloat16 if cuda else torch.float32)
    targets = resolve_targets(model, AdapterConfig())
    args = SFTConfig(output_dir=str(work / "trl"), max_length=cfg["max_length"],
                     per_device_train_batch_size=cfg["batch"], num_train_epochs=1, learning_rate=LEARNING_RATE,
                     logging_steps=10, save_strategy="no",
                     report_to=[], use_cpu=not cuda, bf16=cuda, seed=42, dataloader_num_workers=0, disable_tqdm=True,
                     include_num_input_tokens_seen="non_padding")
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[clock],
                         peft_config=LoraConfig(target_modules=targets, task_type="CAUSAL_LM", **LORA))
    columns = trainer.train_dataset.column_names
    if "labels" in columns:  # TRL 1.16 tokenizes prompt/completion rows into input_ids + labels
        effective = sum(sum(1 for t in labels[1:] if t != -100) for labels in trainer.train_dataset["labels"])
    else:
        mask = next((c for c in ("completion_mask", "assistant_masks") if c in columns), None)
        effective = sum(sum(m[1:]) for m in trainer.train_dataset[mask]) if mask else None
    output = trainer.train()
    return {"steps": trainer.state.global_step, "effective_tokens": effective, "train_loss": output.training_loss}


def _rates(marks: list, warmup: int) -> dict:
    (t0, _), (t_end, tokens) = marks[0], marks[-1]
    w = warmup if len(marks) > warmup + 2 else 0  # too few steps to leave any out
    t_w, tok_w = marks[w]
    return {"tokens": tokens, "train_s": t_end - t0, "tokens_per_s": tokens / (t_end - t0),
            "steady_tokens_per_s": (tokens - tok_w) / (t_end - t_w), "warmup_steps_excluded": w,
            "first_step_s": marks[1][0] - t0 if len(marks) > 1 else None}


def mode_main(mode: str, cfg: dict, result_path: Path) -> None:
    """One mode, in its own process: train, then write rates, memory and MFU."""
    import torch

    cuda = cfg["device"] == "cuda"
    work = Path(cfg["work"]) / mode
    work.mkdir(parents=True, exist_ok=True)
    clock = _step_clock()
    out = _run_trl(cfg, clock, work, cuda) if mode == "trl-padded" else _run_h1tune(cfg, mode == "h1tune-packed",
                                                                                      clock, work)
    out.update(_rates(clock.marks, cfg["warmup"]), **clock.params)
    flops_per_token = 4 * clock.params["frozen_linear"] + 6 * clock.params["trainable"]
    out["mfu"] = flops_per_token * out["steady_tokens_per_s"] / (H200_BF16_PEAK_TFLOPS * 1e12)
    if out["effective_tokens"]:
        out["effective_tokens_per_s"] = out["steady_tokens_per_s"] * out["effective_tokens"] / out["tokens"]
    if cuda:
        out["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    else:
        out["peak_memory_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    write_result(result_path, {"status": "pass", **out})


def gemm_main(result_path: Path) -> None:
    """The bf16 matmul rate this GPU reaches (8192^3, mean of 10 after 3 warm-ups): MFU's practical ceiling."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / 10
    write_result(result_path, {"status": "pass", "tflops": 2 * 8192**3 / seconds / 1e12})


def run(ctx: Ctx) -> StepResult:
    if ctx.alpaca is None:
        raise FileNotFoundError("alpaca_en_demo.json not found: pass --alpaca, or put it in bench/wheels/ "
                                "(python bench/gpu_install.py fetch does)")
    size = SIZES[ctx.device]
    rows = json.loads(Path(ctx.alpaca).read_text())[: size["rows"]]
    subset = ctx.work / "alpaca_rows.json"
    subset.write_text(json.dumps(rows))
    cfg = {**size, "device": ctx.device, "preset": ctx.preset, "dtype": ctx.dtype, "alpaca_rows": str(subset),
           "work": str(ctx.work)}  # dtype explicit: `auto` picks bf16 on CPUs with native bf16, TRL here fp32
    cfg_file = ctx.work / "mode_cfg.json"
    cfg_file.write_text(json.dumps(cfg))
    deadline = time.time() + ctx.budget_s - 5
    results = {}
    jobs = (["gemm"] if ctx.cuda else []) + list(MODES)
    if not ctx.cuda:
        _preload()
    for i, job in enumerate(jobs):
        share = (deadline - time.time()) / (len(jobs) - i)
        result_file = ctx.work / f"{job}.json"
        if ctx.cuda:  # a fresh process per mode: its own CUDA context and peak memory
            cmd = [sys.executable, "-m", "gpu_steps.throughput", "--mode", job, "--cfg", str(cfg_file),
                   "--result", str(result_file)]
            results[job] = run_child(cmd, result_file, share, own_group=False)
        else:  # dry run: forked from this process, which has imported the libraries once
            results[job] = run_forked(mode_main, (job, cfg, result_file), result_file, share)
    return _table(ctx, cfg, results)


def _preload() -> None:
    """Import once what every mode imports, so forked modes start in a fraction of a second (CPU only)."""
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import trl  # noqa: F401

    import h1tune.data  # noqa: F401
    import h1tune.train.run  # noqa: F401


def _table(ctx: Ctx, cfg: dict, results: dict) -> StepResult:
    columns = ["mode", "status", "steps", "tokens", "train s", "tok/s", "steady tok/s", "eff. tok/s", "MFU %",
               "peak mem MiB", "train loss"]
    rows, problems = [], []
    for mode in MODES:
        r = results[mode]
        if r["status"] != "pass":
            rows.append([mode, r["status"].upper(), *[""] * (len(columns) - 2)])
            problems.append(f"{mode}: {r.get('error', r['status'])}: {r.get('log_tail', '')[-600:]}")
            continue
        rows.append([mode, "ok", r["steps"], r["tokens"], r["train_s"], r["tokens_per_s"], r["steady_tokens_per_s"],
                     r.get("effective_tokens_per_s", ""), 100 * r["mfu"], r["peak_memory_mib"], r["train_loss"]])
    notes = [f"preset {cfg['preset']}, {ctx.dtype}, {cfg['rows']} Alpaca rows, max_length {cfg['max_length']}, "
             f"batch {cfg['batch']}, LoRA r{LORA['r']} on h1tune's default targets, one epoch; steady rates "
             f"leave out the first {cfg['warmup']} steps",
             f"MFU against {H200_BF16_PEAK_TFLOPS} TFLOP/s (H200 dense bf16, datasheet), model FLOPs/token = "
             "4 N_frozen_linear + 6 N_lora"]
    if "gemm" in results and results["gemm"]["status"] == "pass":
        notes.append(f"measured bf16 GEMM 8192^3 here: {results['gemm']['tflops']:.0f} TFLOP/s "
                     f"({100 * results['gemm']['tflops'] / H200_BF16_PEAK_TFLOPS:.0f}% of the datasheet peak)")
    if not ctx.cuda:
        notes.append("dry run: CPU fp32 on the tiny preset; MFU against an H200 peak is meaningless here, computed "
                     "only to exercise the code; peak memory is the process's peak RSS")
    ok = [r for r in results.values() if r["status"] == "pass"]
    base = results["trl-padded"]
    packed = results["h1tune-packed"]
    if packed.get("effective_tokens_per_s") and base.get("effective_tokens_per_s"):
        ratio = packed["effective_tokens_per_s"] / base["effective_tokens_per_s"]
        notes.append(f"h1tune packed vs TRL padded: {ratio:.2f}x effective (loss-carrying) tokens/s")
    notes += [f"PROBLEM: {p}" for p in problems]
    summary = "; ".join(f"{m} {results[m]['steady_tokens_per_s']:,.0f} tok/s, MFU {100 * results[m]['mfu']:.1f}%"
                        for m in MODES if results[m]["status"] == "pass") or "no mode finished"
    data = {"config": cfg, "modes": results, "peak_tflops": H200_BF16_PEAK_TFLOPS}
    return StepResult(len(ok) == len(results), summary, columns, rows, data, notes)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", required=True, choices=["gemm", *MODES])
    parser.add_argument("--cfg")
    parser.add_argument("--result", required=True)
    a = parser.parse_args()
    if a.mode == "gemm":
        gemm_main(Path(a.result))
    else:
        mode_main(a.mode, json.loads(Path(a.cfg).read_text()), Path(a.result))
