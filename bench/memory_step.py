"""Peak memory of one 0.5B-shape LoRA step at 2,048 tokens: h1tune vs TRL + peft, same step.

    .venv/bin/python bench/memory_step.py [--preset 0.5b] [--tokens 2048]

Each side runs in its own fresh process (peak RSS is per process, read with wait4): load, LoRA r16 on
the safe targets, one forward/backward/AdamW step on the same 2,048 random tokens. h1tune: its
training path as `h1tune train` takes it (precision by the CPU, its memory plan's checkpointing
decision, the chunked loss). TRL: what SFTTrainer's defaults do on a CPU (fp32 weights, bf16 autocast,
gradient checkpointing, the model's own loss).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SAFE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "gate_proj", "up_proj", "down_proj"]


def h1tune_step(preset: str, tokens: int) -> dict:
    import torch

    from h1tune.adapters import apply_adapter, frozen_base
    from h1tune.config import load_config
    from h1tune.model import load_model
    from h1tune.precision import autocast, flush_denormals, training_precision
    from h1tune.lm.loss import chunked_lm_loss
    from h1tune.train.memory import plan_memory

    cfg = load_config(None, [f"model.name_or_path={preset}"])
    precision = training_precision(cfg)
    flush_denormals()
    model = load_model(cfg.model.model_copy(update={"dtype": precision.weights}), announce=False)
    model = apply_adapter(model, cfg)
    bf16_base = frozen_base.keep_frozen_in_bf16(model, cfg, precision) > 0  # as prepare_model
    plan = plan_memory("auto", model, tokens, 2 if precision.autocast else 4)
    if plan.checkpointing:
        from h1tune.train.arguments import checkpointing_kwargs

        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs(cfg))
        model.enable_input_require_grads()
    ids = torch.randint(5, 30000, (1, tokens), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    start = time.perf_counter()
    with autocast(precision):
        inner = model.get_base_model()
        hidden = inner.model(input_ids=ids, use_cache=False).last_hidden_state
        total, count = chunked_lm_loss(hidden, ids, inner.lm_head, inner.model.lm_head_multiplier)
    (total / count).backward()
    opt.step()
    return {"seconds": time.perf_counter() - start, "setting": f"{precision.describe()}"
            f"{'; frozen base stored bf16' if bf16_base else ''}; checkpointing "
            f"{'on' if plan.checkpointing else 'off'} (estimate {plan.estimate / 2**30:.1f} GiB)"}


def trl_step(preset: str, tokens: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from h1tune.model import resolve_model_path

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(preset), dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})  # TRL's default
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=SAFE_TARGETS, task_type="CAUSAL_LM"))
    ids = torch.randint(5, 30000, (1, tokens), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    opt.step()
    return {"seconds": time.perf_counter() - start,
            "setting": "fp32 weights, bf16 autocast, gradient checkpointing, model loss (SFTTrainer defaults)"}


def bf16_copy(preset: str) -> str:
    """The preset's checkpoint saved in bf16 (cached beside it), for both sides to load."""
    from pathlib import Path

    from h1tune.model import resolve_model_path

    source = Path(resolve_model_path(preset))
    out = source.with_name(source.name + "-bf16")
    if not (out / "config.json").exists():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(out)
        AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return str(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="0.5b")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--bf16-checkpoint", action="store_true",
                        help="both sides load the preset saved in bf16, as hub checkpoints are")
    args = parser.parse_args()
    if args.side:
        out = (h1tune_step if args.side == "h1tune" else trl_step)(args.preset, args.tokens)
        print("RESULT " + json.dumps(out), flush=True)
        return
    if args.bf16_checkpoint:  # the preset saved in bf16, as every hub checkpoint is
        args.preset = bf16_copy(args.preset)
    results = {}
    for side in ("h1tune", "trl"):
        proc = subprocess.Popen([sys.executable, __file__, "--side", side, "--preset", args.preset, "--tokens",
                                 str(args.tokens)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        line = next((l for l in out.splitlines() if l.startswith("RESULT ")), None)
        if status != 0 or line is None:
            sys.exit(f"{side} failed (status {status})")
        results[side] = {**json.loads(line[7:]), "peak_rss_gib": usage.ru_maxrss / 2**20}
    print(f"one LoRA r16 step, preset {args.preset}, {args.tokens:,} tokens, own process each")
    for side, r in results.items():
        print(f"  {side:<7} peak RSS {r['peak_rss_gib']:5.2f} GiB   step {r['seconds']:6.1f} s   {r['setting']}")
    print(f"  h1tune / TRL peak RSS: {results['h1tune']['peak_rss_gib'] / results['trl']['peak_rss_gib']:.2f}x")
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps({"preset": args.preset, "tokens": args.tokens, "results": results}, indent=1))


if __name__ == "__main__":
    main()
