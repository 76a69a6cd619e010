"""The pure-torch double of mamba_ssm's fused `mamba_split_conv1d_scan_combined`, for CPU tests.

    with fused_kernel_installed():     # or the `fused_kernel` pytest fixture below
        model.train(); model(ids, use_cache=False)

The double itself lives in h1tune/ssm/fused_reference.py (the GPU check's dry run uses it too, and a
bench must not import the test suite); this module adds the pytest fixture. tests/kernels_sim runs the
same checks on mamba_ssm's real kernel code (Triton's interpreter).
"""

from __future__ import annotations

import pytest
from transformers.models.falcon_h1 import modeling_falcon_h1 as mf

from h1tune.ssm.fused_reference import (  # noqa: F401  (re-exported for the tests)
    _as_transformers_calls_it,
    fused_kernel_installed,
    mamba_split_conv1d_scan_combined,
)


@pytest.fixture
def fused_kernel(monkeypatch):
    """Install the double for one test (the Mamba training path then bypasses conv1d/out_proj modules)."""
    monkeypatch.setattr(mf, "mamba2_split_conv1d_scan_combined", _as_transformers_calls_it)
    return _as_transformers_calls_it
