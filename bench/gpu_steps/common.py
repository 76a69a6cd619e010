"""What every step of the GPU check shares: its context, its result, a child-process runner, numerics.

Steps run in fresh processes (`run_child`) so that a CUDA error, a hung compile or a kernel seam
left installed by one step cannot spoil the next, and so each step's peak memory is its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# H200 SXM dense bf16 peak from NVIDIA's datasheet (989.4 TFLOP/s without sparsity); a 8192^3 bf16
# matmul measured 769-798 TFLOP/s on these machines (device notes), so MFU near 80% is the ceiling.
H200_BF16_PEAK_TFLOPS = 989.4


@dataclass
class Ctx:
    """Where a step runs and what it may use."""

    device: str  # "cuda" or "cpu"
    work: Path  # scratch directory of this step
    alpaca: str | None  # path of alpaca_en_demo.json, if found
    budget_s: float  # this step's time budget (the driver kills the step past it)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def preset(self) -> str:
        """The model shape of steps 2, 4 and 5: Falcon-H1-0.5B's on a GPU, the tiny one in the dry run."""
        return "0.5b" if self.cuda else "tiny"

    @property
    def dtype(self) -> str:
        return "bfloat16" if self.cuda else "float32"


@dataclass
class StepResult:
    """A step's verdict, its table (columns + rows) and the numbers behind it."""

    passed: bool
    summary: str
    columns: list[str]
    rows: list[list[Any]]
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def format_table(columns: list[str], rows: list[list[Any]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells if i < len(r)]) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.2e}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def rel_err(got, ref) -> float:
    """max |got - ref| / max |ref|, in float64 (the measure the tolerances below are stated in)."""
    ref64 = ref.detach().double()
    scale = float(ref64.abs().max())
    return float((got.detach().double() - ref64).abs().max()) / (scale if scale > 0 else 1.0)


def run_child(cmd: list[str], result_file: Path, timeout: float, env: dict | None = None,
              own_group: bool = True) -> dict:
    """Run `cmd`; return the JSON it wrote to `result_file`.

    Its output goes to a log beside `result_file` (the driver prints tables, not training logs).
    With `own_group` (a step) it leads a new process group and past `timeout` the whole group is
    killed, its own children included; without (a step's sub-job) it stays in the step's group, so
    killing the step kills it too. A child that died without writing a result yields
    {"status": "error"} with the tail of its log.
    """
    result_file.unlink(missing_ok=True)
    log = result_file.with_suffix(".log")
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=own_group,
                                env={**os.environ, **(env or {})})
        try:
            proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            if own_group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            proc.wait()
            return {"status": "timeout", "seconds": time.perf_counter() - start,
                    "error": f"killed after its budget of {timeout:.0f}s", "log_tail": _tail(log)}
    if result_file.is_file():
        result = json.loads(result_file.read_text())
        result.setdefault("seconds", time.perf_counter() - start)
        if result.get("status") == "error":
            result.setdefault("log_tail", _tail(log))
        return result
    return {"status": "error", "seconds": time.perf_counter() - start,
            "error": f"exited with code {proc.returncode} without a result", "log_tail": _tail(log)}


def run_forked(fn, args: tuple, result_file: Path, timeout: float) -> dict:
    """`run_child` for the CPU dry run: a forked child inherits the parent's imports (seconds each).

    Never used with CUDA: a CUDA context does not survive fork, so GPU runs spawn fresh processes.
    `fn(*args)` must write `result_file` itself, as the child's main does. The child stays in the
    caller's process group (killing the step kills it); past `timeout` it alone is killed.
    """
    result_file.unlink(missing_ok=True)
    log = result_file.with_suffix(".log")
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: output to the log, never returns
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            fn(*args)
            code = 0
        except BaseException:  # noqa: BLE001 - its traceback goes to the log the parent reads
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    while time.perf_counter() - start < timeout:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return {"status": "timeout", "seconds": time.perf_counter() - start,
                "error": f"killed after its budget of {timeout:.0f}s", "log_tail": _tail(log)}
    if result_file.is_file():
        return {"seconds": time.perf_counter() - start, **json.loads(result_file.read_text())}
    return {"status": "error", "seconds": time.perf_counter() - start,
            "error": f"exited with status {os.waitstatus_to_exitcode(status)} without a result", "log_tail": _tail(log)}


def _tail(log: Path, lines: int = 25) -> str:
    text = log.read_text(errors="replace") if log.is_file() else ""
    return "\n".join(text.strip().splitlines()[-lines:])


def write_result(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)


def install_fused_stand_in() -> str:
    """Put h1tune.ssm.fused_reference's pure-torch fused kernel where transformers calls mamba_ssm's.

    The dry run's stand-in for `mamba_split_conv1d_scan_combined`: it reads conv1d and out_proj
    weights raw, exactly as the real kernel does, so LoRA wrappers around them are bypassed on CPU.
    (mamba_ssm's real Triton code runs on CPU in tests/kernels_sim; at this preset's size Triton's
    interpreter is far too slow for the dry run's budget.)
    """
    from h1tune.ssm import fused_reference

    return fused_reference.install()


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def seed_all(seed: int = 0) -> None:
    import torch

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
