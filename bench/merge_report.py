"""Merge a sample LoRA and a sample QLoRA adapter into the tiny preset and print the reports.

    python bench/merge_report.py [--workdir /tmp/h1tune-merge-bench]

The adapters are random (lora_B ~ N(0, 0.05)), standing in for trained ones; the numbers show the
verification margin of a plain merge and the drift a QLoRA adapter suffers when merged into the
original 16-bit weights instead of the dequantized 4-bit ones it was trained against.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="where to write (default: a fresh temp dir)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from h1tune.export.merge import merge_adapter
    from h1tune.presets import init_model, save_fake_adapter

    torch.set_num_threads(1)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="h1tune-merge-bench-"))
    base = init_model(work / "base", "tiny", overwrite=True)
    adapter = save_fake_adapter(base, work / "adapter")
    runs = [("LoRA, fp32", {}), ("LoRA, bf16", {"dtype": "bfloat16"}),
            ("QLoRA, merge into dequantized 4-bit (default)", {"quantized_base": "4bit"}),
            ("QLoRA, merge into original 16-bit", {"quantized_base": "4bit", "merge_into": "original"})]
    for i, (title, kwargs) in enumerate(runs):
        report = merge_adapter(None, str(adapter), str(work / f"merged-{i}"), overwrite=True, **kwargs)
        print(f"== {title}\n{report.format()}\n")


if __name__ == "__main__":
    main()
