#!/usr/bin/env bash
# Set up .venv if needed, then run the offline quickstart: LoRA SFT of the embedded tiny Falcon-H1
# on the instruction set shipped with h1tune, then a generation from the trained adapter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export H1TUNE_CACHE="${H1TUNE_CACHE:-$PWD/.h1tune-cache}"
.venv/bin/h1tune train examples/quickstart.yaml --overwrite
.venv/bin/h1tune generate runs/quickstart/final --prompt "What is h1tune?" --max-new-tokens 40
