"""Shipping a fine-tuned Falcon-H1: merge an adapter into a stock checkpoint (merge.py), verified
against base + adapter from disk (verify.py), into a safe output directory (out_dir.py); one GGUF
file through llama.cpp's converter, run in llama.cpp against transformers (gguf.py)."""
