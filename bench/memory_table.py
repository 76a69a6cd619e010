"""Memory per GPU of each Falcon-H1 size under LoRA, QLoRA and full fine-tuning, per strategy:
COMPUTED from parameter counts (models built on the meta device), not measured.

    .venv/bin/python bench/memory_table.py                 # 8 GPUs, LoRA r=16 on the default targets
    .venv/bin/python bench/memory_table.py --gpus 4 --rank 64

Counts come from FalconH1ForCausalLM built on the meta device (no weights, no memory), from the
presets of every published shape (h1tune/family.py, with sources and what was inferred).
The table is "model states": weights, gradients and AdamW moments, plus for FSDP / ZeRO-3 the
layers gathered in flight. Activations, the CUDA context and allocator slack come on top
(docs/distributed.md says how much). Formulas: `state_bytes` below, written out in the docs.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

GiB = 2**30
NF4 = 0.5 + 0.5 / 64 * (1 / 4 + 1 / 64)  # 4-bit codes + double-quantized absmax (8-bit per 64, fp32 per 256 of those)

# Every size is an h1tune preset with the family's published shape (h1tune/family.py says where each
# value comes from and which were inferred).
PRESET_SIZES = {"Tiny-90M": "tiny-90m", "0.5B": "0.5b", "1.5B": "1.5b", "1.5B-Deep": "1.5b-deep", "3B": "3b",
                "7B": "7b", "H1R-7B": "h1r-7b", "34B": "34b"}
STRATEGIES = ("1 GPU", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")
METHODS = ("lora", "qlora", "full")


@dataclass
class Unit:
    """Parameters of one FSDP unit (a decoder layer, the embeddings, the lm_head), split by how QLoRA stores them."""

    quantized: int  # Linear weights bitsandbytes packs to 4 bits
    other: int  # everything else (out_proj and lm_head stay whole; embeddings, conv, norms, A/D/dt)


@dataclass
class Census:
    total: int
    quantized: int
    lora: int  # LoRA parameters at rank r on the default targets
    units: list[Unit]


def build(size: str):
    from h1tune.presets import build_model

    return build_model(PRESET_SIZES[size], device="meta")


def census(model, rank: int) -> Census:
    """Parameter counts by role, with h1tune's policy deciding what is quantized and what LoRA targets."""
    import torch

    from h1tune.config import DEFAULT_TARGETS
    from h1tune.policy import ALWAYS_UNQUANTIZED, param_group, spec_matches

    def unit_of(name: str) -> str:
        """FSDP's units: one per decoder layer; accelerate carves the embeddings and the head out too."""
        match = re.match(r"model\.layers\.(\d+)\.", name)
        return f"layer{match.group(1)}" if match else param_group(name)

    units: dict[str, Unit] = {}
    quantized = lora = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if not name.endswith(ALWAYS_UNQUANTIZED):
            quantized += module.weight.numel()
            units.setdefault(unit_of(name), Unit(0, 0)).quantized += module.weight.numel()
        if any(spec_matches(group, name) for group in DEFAULT_TARGETS):
            lora += rank * (module.in_features + module.out_features)
    for name, param in model.named_parameters():
        unit = units.setdefault(unit_of(name), Unit(0, 0))
        unit.other += param.numel()
    for unit in units.values():
        unit.other -= unit.quantized
    total = sum(p.numel() for p in model.parameters())
    return Census(total, quantized, lora, list(units.values()))


def state_bytes(c: Census, method: str, strategy: str, gpus: int) -> float | None:
    """Bytes per GPU for weights, gradients and AdamW states; None where h1tune refuses the pair.

    full:  h1tune trains in the model dtype (bf16): weight, gradient, AdamW m and v = 8 B/param.
           FSDP2 upcasts trainable weights to fp32 under mixed precision and ZeRO keeps fp32 masters:
           4 (fp32 weight) + 4 (gradient) + 8 (m, v) = 16 B/param sharded, plus ZeRO-2's bf16 copy (2 B).
    lora:  frozen base in bf16 (2 B/param) + adapter in fp32 with gradient and m, v (16 B/param).
    qlora: NF4 base (~0.52 B/param) + the unquantized rest in fp32 (peft's k-bit preparation
           upcasts it: 4 B/param) + the fp32 adapter (16 B/param).
    FSDP and ZeRO-3 shard everything by `gpus` and add two gathered units (the one computing and
    the one prefetched) in their storage dtype.
    """
    n = gpus if strategy not in ("1 GPU", "ddp") else 1
    if method == "full":
        base, trainable = 0.0, 8.0 * c.total if n == 1 else 16.0 * c.total
        unit = max(2.0 * (u.quantized + u.other) for u in c.units)
    elif method == "lora":
        base, trainable = 2.0 * c.total, 16.0 * c.lora
        unit = max(2.0 * (u.quantized + u.other) for u in c.units)
    else:
        if strategy == "deepspeed_zero3":
            return None
        base = NF4 * c.quantized + 4.0 * (c.total - c.quantized)
        trainable = 16.0 * c.lora
        unit = max(NF4 * u.quantized + 4.0 * u.other for u in c.units)
    if strategy in ("1 GPU", "ddp"):
        return base + trainable
    if strategy == "deepspeed_zero2":  # weights replicated; gradients and optimizer states partitioned
        replicated = base + (2.0 * c.total if method == "full" else 0.0)
        return replicated + trainable / n
    return (base + trainable) / n + 2 * unit  # fsdp, deepspeed_zero3


def table(gpus: int, rank: int) -> list[str]:
    header = "| size | params | method | " + " | ".join(
        s if s == "1 GPU" else f"{s} ×{gpus}" for s in STRATEGIES) + " |"
    lines = [header, "|" + "---|" * (3 + len(STRATEGIES))]
    for size in PRESET_SIZES:
        c = census(build(size), rank)
        for method in METHODS:
            cells = []
            for strategy in STRATEGIES:
                value = state_bytes(c, method, strategy, gpus)
                cells.append("refused" if value is None else f"{value / GiB:.1f}")
            label = {"lora": f"LoRA r={rank} ({c.lora / 1e6:.1f}M)", "qlora": "QLoRA", "full": "full"}[method]
            lines.append(f"| {size} | {c.total / 1e9:.2f}B | {label} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8, help="GPUs the run shards over (default 8)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16, h1tune's default)")
    args = parser.parse_args()
    print(f"GiB per GPU of model states (weights, gradients, AdamW states; FSDP/ZeRO-3 with two gathered "
          f"units), COMPUTED from parameter counts; activations not included. LoRA/QLoRA: default targets.")
    print("\n".join(table(args.gpus, args.rank)))


if __name__ == "__main__":
    main()
