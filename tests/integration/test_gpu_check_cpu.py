"""The GPU check's CPU dry run (bench/gpu_check.py --cpu): every step runs and passes on the tiny
preset, so the script cannot rot between GPU loans. The driver runs as a user runs it, in a
subprocess, and its JSON is read back: the same code the GPU run takes, with the labelled
stand-in (h1tune/ssm/fused_reference.py) where the fused kernel would be.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DRIVER = REPO / "bench" / "gpu_check.py"
STEPS = ["paths", "probe", "exactness", "throughput", "qlora"]
REAL_ALPACA = REPO.parent / "shared" / "data" / "real" / "alpaca_en_demo.json"  # ../shared beside the checkout


def _alpaca(tmp: Path) -> Path:
    """The real Alpaca demo rows when ../shared is there, else the fixture's rows repeated to 8 (as plain
    instruction/input/output rows, like the demo's: the TRL baseline reads no system or history)."""
    if REAL_ALPACA.is_file():
        return REAL_ALPACA
    rows = [{k: r[k] for k in ("instruction", "input", "output")}
            for r in json.loads((REPO / "tests/fixtures/data/alpaca.json").read_text())]
    path = tmp / "alpaca.json"
    path.write_text(json.dumps([rows[i % len(rows)] for i in range(8)]))
    return path


def _driver(tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(DRIVER), "--cpu", "--json", str(out), *args], capture_output=True,
                          text=True, env=env, timeout=600)
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    return _driver(tmp, "--alpaca", str(_alpaca(tmp)))


def test_every_step_ran_and_passed(dry_run):
    proc, report = dry_run
    failed = {name: step.get("error") or step.get("notes") for name, step in report["steps"].items()
              if step["status"] != "pass"}
    assert not failed, failed
    assert proc.returncode == 0 and report["passed"] and report["dry_run"] and report["device"] == "cpu"
    assert list(report["steps"]) == STEPS
    for step in report["steps"].values():
        assert step["rows"] and 0 < step["seconds"] <= step["budget_s"]
    assert "ALL PASSED" in proc.stdout
    assert proc.stdout.count("\n== ") == len(STEPS) + 1  # a table per step, then the summary


def test_paths_every_call_on_h1tune_kernels(dry_run):
    data = dry_run[1]["steps"]["paths"]["data"]
    assert set(data["calls"]) == {"train", "eval", "generate"}
    calls = [c for mode in data["calls"].values() for c in mode]
    assert calls and all(c["handled_by"] == "h1tune torch kernel" for c in calls)
    train = {c["function"]: c for c in data["calls"]["train"]}
    assert train["mamba2_split_conv1d_scan_combined"]["returned_none"]  # no fused kernel on CPU: unfused path
    generate = {c["function"] for c in data["calls"]["generate"]}
    assert {"causal_conv1d_update", "mamba2_selective_state_update"} <= generate  # decode steps
    assert "h1tune" in data["mamba_path"]


def test_probe_finds_out_proj_inert_under_the_stand_in(dry_run):
    data = dry_run[1]["steps"]["probe"]["data"]
    assert "stand-in" in data["kernel"] and "fused_reference" in data["kernel"]
    assert data["defaults"]["modules"] == 4 * 8 and data["defaults"]["inert"] == []
    forced = data["forced"]
    assert forced["inert"] == forced["expected_inert"] == [f"model.layers.{i}.mamba.out_proj" for i in range(4)]
    assert forced["inert_never_executed"] and forced["modules"] == 4 * 9


def test_packed_equals_unpacked_within_tolerance(dry_run):
    data = dry_run[1]["steps"]["exactness"]["data"]
    assert set(data["model"]) == {"float32/train", "float32/eval", "bfloat16/train", "bfloat16/eval"}
    for key, r in data["model"].items():
        assert r["rel_err"] <= r["tolerance"] < r["leak_without_seq_idx"], key
    assert data["model"]["float32/train"]["rel_err"] < 1e-5  # CPU fp32: exact up to rounding
    assert len(data["kernels"]) == 12
    for key, r in data["kernels"].items():
        assert r["rel_err"] <= r["tolerance"], key
    with_seq = [r for key, r in data["kernels"].items() if key.endswith("seq_idx")]
    assert len(with_seq) == 4 and all("each document alone" in r["reference"] for r in with_seq)


def test_throughput_modes_all_trained(dry_run):
    modes = dry_run[1]["steps"]["throughput"]["data"]["modes"]
    assert set(modes) == {"h1tune-packed", "h1tune-padded", "trl-padded"}
    for name, m in modes.items():
        assert m["status"] == "pass" and m["steps"] >= 1, name
        assert m["tokens"] > 0 and m["steady_tokens_per_s"] > 0 and 0 < m["mfu"] < 1e-3, name  # CPU vs H200 peak
        assert m["effective_tokens"] and m["effective_tokens"] < m["tokens"] and m["peak_memory_mib"] > 0, name
    # the same rows in every mode: the same non-padding tokens
    assert len({m["tokens"] for m in modes.values()}) == 1


def test_qlora_merge_verified(dry_run):
    data = dry_run[1]["steps"]["qlora"]["data"]
    assert all(data["checks"].values()), data["checks"]
    merge = data["merge"]
    assert merge["quantized_base"] == "4bit" and merge["merge_into"] == "dequantized"
    assert merge["verification"]["relative"] <= merge["tolerance"]
    assert merge["adapter_effect"]["max_abs"] > merge["verification"]["max_abs"]


def test_a_failing_step_does_not_stop_the_others(tmp_path):
    proc, report = _driver(tmp_path, "--steps", "throughput,paths", "--alpaca", str(tmp_path / "missing.json"))
    assert proc.returncode == 1 and not report["passed"]
    assert report["steps"]["throughput"]["status"] == "error"
    assert "alpaca_en_demo.json not found" in report["steps"]["throughput"]["error"]
    assert report["steps"]["paths"]["status"] == "pass"
    assert "SOME STEPS DID NOT PASS" in proc.stdout
