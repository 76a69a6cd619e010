"""The `h1tune export` subcommand and its `gguf` format: options here, the work in export/gguf.py.

    h1tune export gguf runs/sft model.gguf --outtype q8_0

Kept beside the export rather than in cli.py (which registers it) so that cli.py stays small; only
argparse is imported here, so `h1tune --help` stays instant.
"""

from __future__ import annotations

import argparse

OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # h1tune.export.gguf.OUTTYPES, without importing it for --help


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="export a fine-tuned Falcon-H1 to another runtime (gguf: llama.cpp)",
                       description="Export a run, adapter or merged Falcon-H1 to a format another runtime loads. "
                       "Formats: gguf (llama.cpp, Ollama, LM Studio), verified by running the file in llama.cpp.")
    formats = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    g = formats.add_parser(
        "gguf", help="one GGUF file through llama.cpp's own converter, verified in llama.cpp",
        description="Merge an adapter first (verified, as `h1tune merge`; QLoRA into the dequantized base), "
        "convert with llama.cpp's convert_hf_to_gguf.py (it folds the μP multipliers into the weights), then "
        "load the file in llama.cpp and compare it with transformers on chat prompts: same tokenization, "
        "next-token log-probs within tolerance, and for f32 the same greedy tokens. OUT appears only when "
        "all of this passes. Needs `pip install -e '.[gguf]'` in the h1tune checkout (builds llama.cpp for the "
        "CPU: cmake and a C++ compiler; about 15 minutes on 2 cores).")
    g.add_argument("source", help="run directory, adapter directory, merged Falcon-H1 directory, or preset name")
    g.add_argument("out", metavar="OUT.gguf", help="the file to write")
    g.add_argument("--outtype", default="f32", choices=OUTTYPES, help="tensor type in the file (default f32)")
    g.add_argument("--base", help="an adapter's base (default: base_model_name_or_path in adapter_config.json)")
    g.add_argument("--converter", help="llama.cpp's convert_hf_to_gguf.py or its directory (default: "
                   "$H1TUNE_GGUF_CONVERTER, else taken from the installed llama-cpp-python's source distribution)")
    g.add_argument("--converter-sdist", metavar="FILE.tar.gz",
                   help="a downloaded llama-cpp-python sdist to take the converter from (offline machines)")
    g.add_argument("--pre-tokenizer", default="auto",
                   help="what to tell the converter when its hash check does not know the tokenizer: auto "
                   "(gpt-2 for a GPT-2 byte-level BPE such as the presets', else nothing), none, or a llama.cpp "
                   "pre-tokenizer name; the export then checks that llama.cpp tokenizes like transformers")
    g.add_argument("--greedy-tokens", type=int, default=16, help="greedy decode length compared per prompt")
    g.add_argument("--threads", type=int, help="llama.cpp threads for the verification")
    g.add_argument("--tolerance", type=float, help="max |Δ logprob| allowed (default: 1e-3 f32, 0.1 f16, "
                   "0.3 bf16 and q8_0)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing OUT")


def cmd_export(args: argparse.Namespace) -> int:
    from h1tune.export.gguf import export_gguf

    report = export_gguf(args.source, args.out, outtype=args.outtype, base=args.base, converter=args.converter,
                         converter_sdist=args.converter_sdist, pre_tokenizer=args.pre_tokenizer,
                         overwrite=args.overwrite, greedy_tokens=args.greedy_tokens, threads=args.threads,
                         tolerance=args.tolerance)
    print(report.format())
    return 0
