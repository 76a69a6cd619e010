"""Export a sample fine-tune of the tiny preset to GGUF in every outtype and print the comparison table.

    python bench/gguf_export.py [--preset tiny] [--outtypes f32,f16,bf16,q8_0] [--workdir DIR] [--tolerance X]

A random LoRA (lora_B ~ N(0, 0.05), standing in for a trained one) is merged into the preset once;
each outtype is then converted by llama.cpp's converter and run in llama.cpp against transformers
(h1tune.export.gguf). Needs `pip install -e '.[gguf]'`. --tolerance 1e9 reports a file that would fail.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--outtypes", default="f32,f16,bf16,q8_0")
    parser.add_argument("--workdir", default=None, help="where to write (default: a fresh temp dir)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--greedy-tokens", type=int, default=16)
    parser.add_argument("--tolerance", type=float, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from h1tune.export.gguf import export_gguf
    from h1tune.export.merge import merge_adapter
    from h1tune.presets import init_model, save_fake_adapter

    torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="h1tune-gguf-bench-"))
    base = init_model(work / "base", args.preset, overwrite=True)
    adapter = save_fake_adapter(base, work / "adapter")
    merged = work / "merged"
    merge_adapter(None, str(adapter), str(merged), dtype="float32", overwrite=True, greedy_tokens=2)
    rows = []
    for outtype in args.outtypes.split(","):
        start = time.perf_counter()
        report = export_gguf(str(merged), work / f"{args.preset}-{outtype}.gguf", outtype=outtype, overwrite=True,
                             threads=args.threads, greedy_tokens=args.greedy_tokens, tolerance=args.tolerance)
        c = report.check
        rows.append(f"| {outtype:5} | {report.size_bytes / 2**20:8.2f} | {c.greedy_same}/{c.prompts} | "
                    f"{c.greedy_tokens_same}/{c.greedy_tokens} | {c.top1_agreement:6.1%} | {c.max_dlogprob:9.3g} | "
                    f"{c.mean_dlogprob:9.3g} | {c.tolerance:g} | {'PASS' if c.passed else 'FAIL'} | "
                    f"{time.perf_counter() - start:5.1f} |")
    safetensors = sum(p.stat().st_size for p in merged.glob("*.safetensors")) / 2**20
    print(f"{args.preset} preset + random LoRA, merged fp32 checkpoint {safetensors:.2f} MiB; llama.cpp vs "
          f"transformers (fp32) on {c.prompts} chat prompts, {args.greedy_tokens} greedy tokens each")
    print("| type  | size MiB | greedy identical | greedy tokens | top-1 agree | max Δlogprob | mean Δlogprob "
          "| tolerance | verdict | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
