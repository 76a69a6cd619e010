#!/usr/bin/env bash
# The CUDA path checked on one GPU in one command (issue 16): install the Mamba kernels and the
# packages carried in bench/wheels/, then run bench/gpu_check.py's five steps. Idempotent (what is
# installed already is left alone); the whole run stays under H1TUNE_GPU_CHECK_SECONDS (570).
#
#   bash bench/gpu_check.sh --json "$OUT/gpu_check.json"     # extra arguments go to gpu_check.py
#   bash bench/gpu_check.sh --steps throughput,qlora           # rerun some steps (installs are skipped)
#
# Beforehand, where the package index is reachable (a torch env, e.g. the project's .venv):
#   .venv/bin/python bench/gpu_install.py fetch     # ~61 MiB into bench/wheels/ (git ignores it)
# and have the device call carry it: carry ["bench/wheels"]. README.md, "GPU check", says more.
set -uo pipefail
start=$(date +%s)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}  # the GPU image's python3 is the one with PyTorch
limit=${H1TUNE_GPU_CHECK_SECONDS:-570}
logs=${OUT:-${TMPDIR:-/tmp}}
export H1TUNE_CACHE=${H1TUNE_CACHE:-$PWD/.h1tune-cache}
export H1TUNE_WHEELS=${H1TUNE_WHEELS:-$PWD/bench/wheels}
export PYTHONUNBUFFERED=1

echo "== install: kernels and packages from $H1TUNE_WHEELS (only what is missing)"
report="$logs/gpu_install.json"
if ! "$PY" bench/gpu_install.py install --wheels "$H1TUNE_WHEELS" --report "$report" --log "$logs/gpu_install.log"; then
    echo "   some installs failed (log: $logs/gpu_install.log); the steps that need them will report it"
fi
echo "== install took $(( $(date +%s) - start ))s; running the check"
"$PY" bench/gpu_check.py --deadline-at $((start + limit)) --install-report "$report" "$@"
