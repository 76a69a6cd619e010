"""The `triton` tier: mamba_ssm's real Triton kernels in Triton's interpreter on CPU.

    bash scripts/test_kernels.sh        # sets up .venv-kernels and .kernels-src, then runs this folder

Without h1tune[kernels-sim] and mamba-ssm's unpacked source (the main .venv) every test here is
skipped, and the skip reason is the install line. Each comparison records its worst error; the
table is printed at the end of the run.
"""

from __future__ import annotations

import pytest

_ERRORS = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def real():
    """mamba_ssm's real kernels, loaded once (h1tune.ssm.triton_sim), or a skip naming the install line."""
    from h1tune.ssm import triton_sim

    why = triton_sim.available()
    if why:
        pytest.skip(why)
    return triton_sim.load()


@pytest.fixture(autouse=True)
def _real_kernels_or_skip(real):
    """Every test of the tier needs the kernels: skip before building anything without them."""


@pytest.fixture
def record(request):
    """record(comparison, dtype, error, tolerance): the worst error of a comparison, for the closing table."""
    errors = request.config.stash.setdefault(_ERRORS, {})

    def put(comparison: str, dtype: str, error: float, tolerance: float) -> None:
        key = (comparison, dtype)
        worst = max(error, errors.get(key, (0.0, tolerance))[0])
        errors[key] = (worst, tolerance)

    return put


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    errors = config.stash.get(_ERRORS, {})
    if not errors:
        return
    from h1tune.ssm import triton_sim

    real = triton_sim.load()
    terminalreporter.section("worst errors vs the real kernels (max|got - ref| / max|ref|)")
    width = max(len(c) for c, _ in errors)
    for (comparison, dtype), (worst, tol) in sorted(errors.items()):
        terminalreporter.write_line(f"{comparison.ljust(width)}  {dtype:8}  {worst:.2e}  (tolerance {tol:.0e})")
    versions = ", ".join(f"{k} {v}" for k, v in real.versions.items())
    terminalreporter.write_line(f"versions: {versions}; TRITON_INTERPRET=1")
