#!/usr/bin/env bash
# Set up .venv if needed, then run the offline quickstart on the embedded tiny Falcon-H1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export H1TUNE_CACHE="${H1TUNE_CACHE:-$PWD/.h1tune-cache}"
.venv/bin/h1tune init-model runs/quickstart-model --preset tiny --overwrite
.venv/bin/h1tune generate runs/quickstart-model --prompt "What is Falcon-H1?" --max-new-tokens 24
