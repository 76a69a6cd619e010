"""Step 5: QLoRA 4-bit: a few training steps on the NF4 base, then merge and verify.

h1tune trains as a user would run it (`run_training`: 4-bit NF4 base with out_proj and lm_head
kept whole, the adapter probe on the k-bit model, LoRA on the default targets), then
`merge_adapter` merges the adapter into the dequantized 4-bit weights it trained against, writes a
stock checkpoint, reloads it from disk and compares its logits and greedy decodes with the QLoRA
model (failing above tolerance). On a GPU: the 0.5B shape, bitsandbytes' CUDA kernels, a bf16
merge; in the dry run: the tiny preset on bitsandbytes' CPU backend, fp32.
A learning rate of 2e-3 makes the adapter move the logits visibly in a few steps, so "merged ==
QLoRA model" is compared against an adapter effect far larger than the merge error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from gpu_steps.common import Ctx, StepResult

SIZES = {"cuda": {"rows": 48, "max_length": 256, "batch": 4, "steps": 6, "merge_dtype": "bfloat16"},
         "cpu": {"rows": 8, "max_length": 64, "batch": 4, "steps": 2, "merge_dtype": "base"}}


def _train(ctx: Ctx, size: dict):
    from h1tune.config import load_config
    from h1tune.train import run_training

    rows = json.loads(Path(ctx.alpaca).read_text())[: size["rows"]]
    subset = ctx.work / "alpaca_rows.json"
    subset.write_text(json.dumps(rows))
    cfg = load_config(None, [
        f"model.name_or_path={ctx.preset}", f"model.dtype={ctx.dtype}", "model.quantization=4bit",
        f"data.train={subset}",
        f"data.max_length={size['max_length']}", "data.truncation=truncate", "adapter.lora_dropout=0.0",
        "training.learning_rate=2e-3", f"training.max_steps={size['steps']}",
        f"training.per_device_train_batch_size={size['batch']}", "training.logging_steps=1",
        "training.save_steps=100000", "training.report_to=[none]", f"output_dir={ctx.work / 'run'}"])
    return run_training(cfg)


def run(ctx: Ctx) -> StepResult:
    if ctx.alpaca is None:
        raise FileNotFoundError("alpaca_en_demo.json not found: pass --alpaca, or put it in bench/wheels/")
    from h1tune.export.merge import merge_adapter
    from h1tune.train.plots import read_metrics

    size = SIZES[ctx.device]
    trained = _train(ctx, size)
    losses = [m["loss"] for m in read_metrics(trained.output_dir) if "loss" in m]
    report = merge_adapter(None, str(trained.final_dir), str(ctx.work / "merged"), dtype=size["merge_dtype"])
    v, effect = report.verification, report.adapter_effect
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    dequantized = report.quantized_base == "4bit" and report.merge_into == "dequantized"
    checks = {
        "losses finite": finite,
        "merged into the dequantized 4-bit base": dequantized,
        "merged checkpoint within tolerance": report.passed,
        "adapter effect larger than the merge error": effect.max_abs > v.max_abs,
    }
    rows = [
        ["train", f"{trained.steps} steps, loss first -> last",
         f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "no loss logged", "", _ok(finite)],
        ["merge", "merged into", f"{report.merge_into} {report.quantized_base} base, saved as {report.dtype}", "",
         _ok(checks["merged into the dequantized 4-bit base"])],
        ["verify", "merged (from disk) vs QLoRA model: max|dlogit|/max|logit|", v.relative, report.tolerance,
         _ok(report.passed)],
        ["verify", "  top-1 agreement / identical greedy decodes",
         f"{v.argmax_agreement:.1%} / {v.greedy_same}/{v.prompts}", "", ""],
        ["verify", "adapter effect (base vs base + adapter): max|dlogit|", effect.max_abs, f"> {v.max_abs:.3g}",
         _ok(checks["adapter effect larger than the merge error"])],
    ]
    if report.drift is not None:
        rows.append(["verify", "drift had it merged into the 16-bit original instead", report.drift.relative, "", ""])
    notes = [f"preset {ctx.preset}, NF4 + double quantization, compute {ctx.dtype}, {size['rows']} Alpaca rows, "
             f"max_length {size['max_length']}, batch {size['batch']}, lr 2e-3"]
    if not ctx.cuda:
        notes.append("dry run: bitsandbytes' CPU backend on the tiny preset")
    notes += [f"PROBLEM: {name}" for name, ok in checks.items() if not ok]
    summary = (f"{trained.steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}; merged vs QLoRA "
               f"{v.relative:.2e} of max|logit| (tolerance {report.tolerance:.0e}), adapter effect "
               f"{effect.relative:.2e}") if losses else "no loss logged"
    data = {"steps": trained.steps, "losses": losses, "train_seconds": trained.train_seconds,
            "merge": report.as_dict(), "checks": checks}
    return StepResult(all(checks.values()), summary, ["stage", "quantity", "value", "tolerance", "verdict"], rows,
                      data, notes)


def _ok(flag: bool) -> str:
    return "ok" if flag else "FAIL"
