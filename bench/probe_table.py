"""Print the adapter probe's table for the tiny preset and the Falcon-H1-0.5B shape (random weights).

    .venv/bin/python bench/probe_table.py            # tiny (2x32 tokens) and 0.5b (1x64 tokens)
    .venv/bin/python bench/probe_table.py --tiny     # tiny only (seconds)

Default LoRA targets (attention, mamba in_proj, mlp), training path (model.train(), use_cache=False).
The 0.5b model is built in fp32 (~2 GB).
"""

from __future__ import annotations

import argparse
import time


def probe_preset(preset: str, batch_size: int, seq_len: int) -> None:
    import torch

    from h1tune.adapters import apply_adapter
    from h1tune.config import H1tuneConfig
    from h1tune.adapters.probe import probe_adapters
    from h1tune.presets import build_model

    start = time.perf_counter()
    model = build_model(preset)
    built = time.perf_counter() - start
    model = apply_adapter(model, H1tuneConfig())
    vocab = min(model.config.vocab_size, 1024)
    ids = torch.randint(5, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    report = probe_adapters(model, {"input_ids": ids}, strict=False)
    print(f"\n== {preset}: {batch_size}x{seq_len} tokens, built in {built:.1f}s ==")
    print(report.format_table())
    print("\n".join(report.format_group_lines()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="skip the 0.5b shape")
    args = parser.parse_args()
    probe_preset("tiny", 2, 32)
    if not args.tiny:
        probe_preset("0.5b", 1, 64)


if __name__ == "__main__":
    main()
