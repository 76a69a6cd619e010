"""Shipping a fine-tuned Falcon-H1: merge an adapter into a stock checkpoint (merge.py), verified
against base + adapter from disk (verify.py), into a safe output directory (out_dir.py)."""
