#!/usr/bin/env bash
# Set up .venv if needed, then run the whole test suite offline on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export H1TUNE_CACHE="${H1TUNE_CACHE:-$PWD/.h1tune-cache}"
exec .venv/bin/python -m pytest "$@"
