#!/usr/bin/env bash
# The real Mamba kernels on CPU: mamba_ssm's Triton kernels in Triton's interpreter (tests/kernels_sim).
#
#   bash scripts/test_kernels.sh            # set up .venv-kernels + .kernels-src if needed, run the tier
#   bash scripts/test_kernels.sh -k probe   # extra arguments go to pytest
#
# A venv of its own (.venv-kernels), because triton's wheel is ~1 GiB and the main suite needs none of
# it. torch is installed first and pinned (torch==2.13.0 is a CPU wheel on our machines; any other spec
# pulls a multi-GB CUDA build). mamba-ssm is used from its unpacked sdist, never built or installed:
# its build compiles CUDA, and its package __init__ imports CUDA extensions (h1tune.ssm.triton_sim
# loads only the Triton modules). causal-conv1d is not needed: its functions are CUDA-only, and
# triton_sim puts a torch conv where mamba_ssm looks for them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=.venv-kernels
SRC=.kernels-src
MAMBA_SSM=2.3.2.post1  # keep in step with h1tune/ssm/triton_sim.py (MAMBA_SSM_VERSION)

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp=$VENV/.h1tune-installed
want=$(sha256sum pyproject.toml scripts/test_kernels.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet torch==2.13.0
  "$VENV/bin/python" -m pip install --quiet -e ".[test,kernels-sim]"
  echo "$want" > "$stamp"
fi

mamba_src=$SRC/mamba_ssm-$MAMBA_SSM
if [ ! -f "$mamba_src/mamba_ssm/ops/triton/ssd_combined.py" ]; then
  mkdir -p "$SRC"
  # --no-build-isolation: the sdist's metadata step imports torch (from this venv); without it pip fails.
  MAMBA_SKIP_CUDA_BUILD=TRUE "$VENV/bin/python" -m pip download --quiet --no-deps --no-binary :all: \
    --no-build-isolation "mamba-ssm==$MAMBA_SSM" -d "$SRC"
  tar -xzf "$SRC/mamba_ssm-$MAMBA_SSM.tar.gz" -C "$SRC"
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export H1TUNE_CACHE="${H1TUNE_CACHE:-$PWD/.h1tune-cache}"
export H1TUNE_MAMBA_SSM_SRC="$PWD/$mamba_src"
# Triton reads TRITON_INTERPRET when it is imported: kernels then run in numpy on CPU tensors.
export TRITON_INTERPRET=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$VENV/bin/python" -m pytest tests/kernels_sim -p no:cacheprovider "$@"
