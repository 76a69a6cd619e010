"""The CUDA path checked on a real GPU in one run (issue 16), and a CPU dry run of the same code.

    bash bench/gpu_check.sh --json $OUT/gpu_check.json         # GPU machine: installs carried kernels, runs this
    python3 bench/gpu_check.py --json gpu_check.json            # needs CUDA, mamba_ssm and causal_conv1d
    .venv/bin/python bench/gpu_check.py --cpu --json dry.json   # dry run; tests/integration/test_gpu_check_cpu.py

Steps (bench/gpu_steps/, one module each):
  1. paths       which Mamba implementation train / eval / generate run, call by call
  2. probe       the adapter probe on the 0.5B shape: defaults live, a forced out_proj LoRA inert
  3. exactness   packed == unpacked with seq_idx (fp32, bf16); h1tune's torch kernels vs the real kernels
  4. throughput  0.5B bf16 LoRA SFT: h1tune packed / padded vs TRL + peft padded; peak memory; MFU
  5. qlora       4-bit QLoRA for a few steps, merged into the dequantized base, verified from disk
Each step runs in its own process under a time budget (and the run under a global deadline), so a
step that fails, crashes or hangs is reported in its table and the others still run. A table per
step is printed as it finishes; --json gets everything, rewritten after each step. Exit code 0
only when every step passed. In the dry run (--cpu) the tiny preset replaces the 0.5B shape, and
GPU-only pieces run on labelled stand-ins: for the fused kernel, h1tune/ssm/fused_reference.py (pure
torch, mamba_ssm's signature; nothing here imports tests/). mamba_ssm's real Triton code runs on CPU
in tests/kernels_sim (bash scripts/test_kernels.sh), probe included, at an interpreter-sized mixer: at the
dry run's tiny preset Triton's interpreter takes ~32 s per forward (measured) and the probe step
runs ~70 (40 min or more), far past its 90 s budget, so the dry run keeps the stand-in even where that tier is set up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from gpu_steps import STEPS, TITLES  # noqa: E402
from gpu_steps.common import H200_BF16_PEAK_TFLOPS, Ctx, format_table, run_child, write_result  # noqa: E402

BUDGETS = {  # seconds per step; the global deadline can only shorten them
    "cuda": {"paths": 120, "probe": 150, "exactness": 120, "throughput": 240, "qlora": 180},
    "cpu": {"paths": 90, "probe": 90, "exactness": 90, "throughput": 150, "qlora": 120},
}
MIN_STEP_S = 20  # a step with less time left than this is skipped, not started
ALPACA = "alpaca_en_demo.json"
PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "triton", "mamba_ssm",
            "causal_conv1d")
CUDA_PROBE = """
import json, torch
out = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
if torch.cuda.is_available():
    out["gpu"] = torch.cuda.get_device_name(0)
    out["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
print(json.dumps(out))
"""


def child_env() -> dict[str, str]:
    path = os.pathsep.join([str(REPO / "src"), str(BENCH), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "USE_HUB_KERNELS": "0",
            # Triton >= 3.4 keeps autotuning results on disk: mamba_ssm's kernels autotune over up to ~100
            # configs on first use, and each step is a new process (the first one pays, the rest reuse).
            "TRITON_CACHE_AUTOTUNING": os.environ.get("TRITON_CACHE_AUTOTUNING", "1"),
            "H1TUNE_CACHE": os.environ.get("H1TUNE_CACHE", str(REPO / ".h1tune-cache"))}


def find_alpaca(explicit: str | None) -> str | None:
    """--alpaca when given (a wrong path fails steps 4 and 5, never silently swapped), else ../shared, bench/wheels."""
    if explicit:
        return explicit if Path(explicit).is_file() else None
    wheels = Path(os.environ.get("H1TUNE_WHEELS", BENCH / "wheels"))
    candidates = [REPO.parent / "shared/data/real" / ALPACA, wheels / ALPACA]
    return next((str(p) for p in candidates if p.is_file()), None)


def probe_environment(cuda: bool) -> dict:
    """Package versions (metadata only: this process never imports torch), and the GPU in a child."""
    import importlib.metadata as md
    import platform

    out: dict = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    if cuda:
        proc = subprocess.run([sys.executable, "-c", CUDA_PROBE], capture_output=True, text=True)
        if proc.returncode != 0:
            return {**out, "error": (proc.stderr.strip().splitlines() or ["CUDA probe failed"])[-1]}
        out.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def run_step_child(name: str, ctx_file: Path, result_file: Path) -> int:
    """Inside the step's own process: run it and write its result (an exception is a result too)."""
    ctx = Ctx(**json.loads(ctx_file.read_text()))
    ctx.work = Path(ctx.work)
    start = time.perf_counter()
    try:
        import importlib

        result = importlib.import_module(f"gpu_steps.{name}").run(ctx)
        payload = {"status": "pass" if result.passed else "fail", **result.as_dict()}
    except BaseException as exc:  # noqa: BLE001 - reported in the table, the driver goes on
        payload = {"status": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    payload["seconds"] = time.perf_counter() - start
    write_result(result_file, payload)
    return 0


def print_step(name: str, result: dict) -> None:
    status = result["status"].upper()
    print(f"\n== {TITLES[name]} -- {status} in {result.get('seconds', 0):.1f}s (budget {result['budget_s']:.0f}s)")
    if result.get("summary"):
        print(result["summary"])
    if result.get("rows"):
        print(format_table(result["columns"], result["rows"]))
    for note in result.get("notes", []):
        print(f"  note: {note}")
    if result.get("error"):
        print(f"  error: {result['error']}")
        tail = result.get("traceback") or result.get("log_tail")
        if tail:
            print("  " + "\n  ".join(tail.strip().splitlines()[-12:]))
    sys.stdout.flush()


def print_summary(report: dict) -> None:
    rows = [[name, r["status"].upper(), f"{r.get('seconds', 0):.1f}", f"{r['budget_s']:.0f}",
             r.get("summary") or r.get("error") or ""] for name, r in report["steps"].items()]
    env = report["environment"]
    print(f"\n== GPU check summary ({'CPU dry run' if report['dry_run'] else env.get('gpu', 'cuda')}; "
          f"torch {env.get('torch')}, transformers {env.get('transformers')}, mamba_ssm {env.get('mamba_ssm')}, "
          f"causal_conv1d {env.get('causal_conv1d')})")
    print(format_table(["step", "status", "s", "budget", "summary"], rows))
    print("ALL PASSED" if report["passed"] else "SOME STEPS DID NOT PASS")


def run_all(args) -> int:
    device = "cpu" if args.cpu else "cuda"
    env = probe_environment(cuda=not args.cpu)
    if not args.cpu and not env.get("cuda_available"):
        why = f"no CUDA device ({env.get('error') or 'torch.cuda.is_available() is False'}); pass --cpu for the dry run"
        print(why, file=sys.stderr)
        if args.json:
            write_result(Path(args.json), {"device": device, "environment": env, "error": why, "passed": False})
        return 2
    deadline = args.deadline_at or (time.time() + args.time_limit if args.time_limit else None)
    install = json.loads(Path(args.install_report).read_text()) if args.install_report and \
        Path(args.install_report).is_file() else None
    report = {"device": device, "dry_run": args.cpu, "environment": env, "install": install,
              "h200_bf16_peak_tflops": H200_BF16_PEAK_TFLOPS, "steps": {}, "passed": False}
    alpaca = find_alpaca(args.alpaca)
    steps = [s.strip() for s in args.steps.split(",")] if args.steps else list(STEPS)
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        print(f"--steps: unknown {unknown}; choose from {', '.join(STEPS)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="h1tune-gpu-check-") as tmp:
        for name in steps:
            budget = float(BUDGETS[device][name])
            if deadline is not None:
                budget = min(budget, deadline - time.time() - 5)
            if budget < MIN_STEP_S:
                result = {"status": "skipped", "error": "the run's deadline leaves no time for this step "
                          f"(rerun with --steps {name})", "seconds": 0.0}
            else:
                work = Path(tmp) / name
                work.mkdir()
                ctx_file, result_file = work / "ctx.json", work / "result.json"
                ctx_file.write_text(json.dumps({"device": device, "work": str(work), "alpaca": alpaca,
                                                "budget_s": budget}))
                cmd = [sys.executable, __file__, "--run-step", name, "--ctx-file", str(ctx_file),
                       "--result", str(result_file)]
                result = run_child(cmd, result_file, budget, env=child_env())
            result["budget_s"] = budget
            report["steps"][name] = result
            print_step(name, result)
            report["passed"] = all(r["status"] == "pass" for r in report["steps"].values()) and \
                len(report["steps"]) == len(steps)
            if args.json:
                write_result(Path(args.json), report)
    print_summary(report)
    return 0 if report["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="dry run on CPU: tiny preset, labelled stand-ins")
    parser.add_argument("--json", help="write every step's result here (rewritten after each step)")
    parser.add_argument("--steps", help=f"comma-separated subset of {','.join(STEPS)} (default: all)")
    parser.add_argument("--alpaca", help=f"{ALPACA} (default: ../shared/data/real/, then bench/wheels/)")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds for the whole run")
    parser.add_argument("--deadline-at", type=float, default=None, help="epoch seconds by which to finish")
    parser.add_argument("--install-report", help="JSON written by bench/gpu_install.py install (kept in --json)")
    parser.add_argument("--run-step", help=argparse.SUPPRESS)
    parser.add_argument("--ctx-file", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_step:
        return run_step_child(args.run_step, Path(args.ctx_file), Path(args.result))
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
