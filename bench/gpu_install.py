"""Carry what the GPU check needs to a machine without internet, and install it there.

    .venv/bin/python bench/gpu_install.py fetch      # here (package index reachable): fills bench/wheels/
    python3 bench/gpu_install.py install             # there; bench/gpu_check.sh runs it for you

The GPU image (CUDA 13, PyTorch 2.11, Triton 3.6, Python 3.12, transformers 5.17, no internet; see
../shared/reference/gpu-kernels-offline.md and the device notes) has neither `mamba_ssm` nor
`causal_conv1d`, and its transformers is older than h1tune supports. `fetch` puts into
bench/wheels/ (git ignores the folder: name it in the device call's `carry`):
- the two kernel source distributions (their metadata step imports torch, hence a torch env here);
- the wheels h1tune, TRL and bitsandbytes need beyond the image (py3.12, manylinux x86-64);
- the Alpaca demo rows, because ../shared does not travel with the working tree.

`install` is idempotent: a package already at a supported version, or a kernel that imports, is
left alone. Two upstream hazards are handled when building the kernels offline:
- both setup.py files first try to download a prebuilt wheel from GitHub and catch only HTTP
  errors, so without a network the build dies: FORCE_BUILD skips that attempt;
- mamba_ssm's `__init__` imports Mamba-1's `selective_scan_cuda`, which MAMBA_SKIP_CUDA_BUILD does
  not compile, and transformers imports the package root first, so the Triton SSD kernels would
  silently never load. The installed `__init__` keeps those imports but tolerates their absence.
causal_conv1d is compiled for this GPU's architecture only (upstream builds nine: minutes longer).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / "bench" / "wheels"
ALPACA_NAME = "alpaca_en_demo.json"
CARRY_LIMIT_MIB = 64  # the device tool carries at most this much working tree per call
KERNEL_SDISTS = {"causal_conv1d": ("causal-conv1d", "1.7.0"), "mamba_ssm": ("mamba-ssm", "2.3.2.post1")}
# (distribution, accepted versions, version fetched). Groups install separately, so a missing wheel
# costs only the steps that need that group (h1tune: all; trl: step 4's baseline; qlora: step 5).
GROUPS: dict[str, list[tuple[str, str, str]]] = {
    "build": [("wheel", ">=0.40", "0.45.1")],  # mamba_ssm's setup.py imports wheel.bdist_wheel
    "h1tune": [("transformers", ">=5.24,<5.25", "5.24.0"), ("peft", ">=0.21.2,<0.22", "0.21.2"),
               ("pydantic", ">=2.10,<3", "2.14.4"), ("einops", ">=0.7", "0.8.1")],
    "trl": [("trl", ">=1.16,<1.17", "1.16.0"), ("datasets", ">=5.2,<6", "5.2.0")],
    "qlora": [("bitsandbytes", ">=0.50.2,<0.51", "0.50.2")],
}
# Dependencies of the above that the image lacks or may hold at too old a version; pip takes them
# from bench/wheels only when the resolver needs them.
SUPPORT = [("wheel", "0.45.1"), ("pydantic-core", "2.50.5"), ("annotated-types", "0.8.0"),
           ("typing-inspection", "0.4.5"),
           ("typing-extensions", "4.16.0"), ("regex", "2026.11.19"), ("dill", "0.4.1"),
           ("multiprocess", "0.70.19"), ("fsspec", "2026.9.0")]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
IMPORT_CHECKS = {
    "causal_conv1d": "import causal_conv1d, causal_conv1d_cuda",
    "mamba_ssm": "import mamba_ssm, mamba_ssm.ops.triton.ssd_combined, mamba_ssm.ops.triton.selective_state_update",
}
INIT_GUARD = (
    "# bench/gpu_install.py: Mamba-1's selective_scan_cuda is not compiled (MAMBA_SKIP_CUDA_BUILD); keep the\n"
    "# package importable so transformers reaches the Triton SSD kernels under mamba_ssm.ops.triton.\n"
)


def _last_error(out: str) -> str:
    """The most telling line of a failed pip run (its last lines are generic hints)."""
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or line.startswith("ERROR")]
    return (errors or lines or ["pip failed"])[-1]


def _pip(args: list[str], env: dict | None = None, log: Path | None = None) -> tuple[bool, str]:
    cmd = [sys.executable, "-m", "pip", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    out = proc.stdout + proc.stderr
    if log is not None:
        with log.open("a") as fh:
            fh.write(f"$ {' '.join(cmd)}\n{out}\n")
    return proc.returncode == 0, out


# ---------------------------------------------------------------------------------------------
# fetch (a machine that reaches the package index)

def fetch(dest: Path, python_version: str, skip: set[str]) -> int:
    """Download everything `install` needs into `dest`; returns 0 when all of it arrived."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = dest / ".gitignore"  # bench/wheels/ has one in the repo; another --wheels folder gets one here
    if not ignore.is_file():
        ignore.write_text("# carried to the GPU machine by the device call, never committed\n*\n!.gitignore\n")
    failures = []
    sdists = [f"{name}=={version}" for key, (name, version) in KERNEL_SDISTS.items() if key not in skip]
    if sdists:
        ok, out = _pip(["download", "--no-deps", "--no-build-isolation", "--no-binary", ":all:", "-d", str(dest),
                        *sdists], env={"MAMBA_SKIP_CUDA_BUILD": "TRUE", "CAUSAL_CONV1D_SKIP_CUDA_BUILD": "TRUE"})
        if not ok:
            failures.append(f"kernel sources ({_last_error(out)}); "
                            "their metadata step imports torch: run fetch with a python that has torch")
    pins = [f"{name}=={fetched}" for group, reqs in GROUPS.items() if group not in skip for name, _, fetched in reqs]
    pins += [f"{name}=={version}" for name, version in SUPPORT]
    platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
    ok, out = _pip(["download", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                    "--implementation", "cp", *platform_args, "--platform", "any", "-d", str(dest), *pins])
    if not ok:
        failures.append(f"wheels: {_last_error(out)}")
    alpaca = next((p for p in (REPO.parent / "shared/data/real" / ALPACA_NAME,
                               Path("/work/shared/data/real") / ALPACA_NAME) if p.is_file()), None)
    if alpaca is None:
        failures.append(f"{ALPACA_NAME} not found under ../shared/data/real/ (step 4 needs it)")
    else:
        shutil.copy2(alpaca, dest / ALPACA_NAME)
    total = sum(p.stat().st_size for p in dest.iterdir() if p.is_file())
    for path in sorted(dest.iterdir()):
        print(f"  {path.stat().st_size / 2**20:8.2f} MiB  {path.name}")
    print(f"  {total / 2**20:8.2f} MiB  in {dest} (the device call carries at most {CARRY_LIMIT_MIB} MiB "
          "of working tree; `--skip qlora` drops bitsandbytes, 41 MiB, and step 5 with it)")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


# ---------------------------------------------------------------------------------------------
# install (the GPU machine)

def _unmet(reqs: list[tuple[str, str, str]]) -> list[tuple[str, str, str, str | None]]:
    """(name, accepted, fetched, installed version or None) for each requirement not satisfied here."""
    from importlib import metadata

    from packaging.specifiers import SpecifierSet

    unmet = []
    for name, accepted, fetched in reqs:
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have is None or have not in SpecifierSet(accepted):
            unmet.append((name, accepted, fetched, have))
    return unmet


def install_group(group: str, wheels: Path, log: Path) -> dict:
    reqs = GROUPS[group]
    unmet = _unmet(reqs)
    if not unmet:
        return {"action": "present", "detail": ", ".join(f"{n}{a}" for n, a, _ in reqs)}
    needed = "; ".join(f"{name}{accepted} (have {have or 'none'})" for name, accepted, _, have in unmet)
    # Only the unmet ones: naming a satisfied package too makes pip re-resolve (and upgrade) its deps.
    pins = [f"{name}=={fetched}" for name, _, fetched, _ in unmet]
    ok, out = _pip(["install", "--no-index", "--find-links", str(wheels), "--no-compile", "-q", *pins], log=log)
    if not ok:
        return {"action": "failed", "detail": f"needed {needed}: {_last_error(out)} "
                "(bring the wheels with `python bench/gpu_install.py fetch`)"}
    return {"action": "installed", "detail": needed}


def _importable(key: str) -> tuple[bool, str]:
    proc = subprocess.run([sys.executable, "-c", IMPORT_CHECKS[key]], capture_output=True, text=True)
    return proc.returncode == 0, (proc.stderr.strip().splitlines() or [""])[-1]


def _unpack(sdist: Path, into: Path) -> Path:
    with tarfile.open(sdist) as tar:
        tar.extractall(into, filter="data")
    return next(p for p in into.iterdir() if p.is_dir())


def patch_conv1d_archs(setup_py: Path) -> bool:
    """Let H1TUNE_NVCC_GENCODE replace the nine upstream -gencode targets; False if the anchor moved."""
    text = setup_py.read_text()
    anchor = "    # HACK: The compiler flag -D_GLIBCXX_USE_CXX11_ABI"
    if anchor not in text or "H1TUNE_NVCC_GENCODE" in text:
        return "H1TUNE_NVCC_GENCODE" in text
    hook = ('    if os.getenv("H1TUNE_NVCC_GENCODE"):  # bench/gpu_install.py: this GPU\'s architecture only\n'
            '        cc_flag = [f for a in os.environ["H1TUNE_NVCC_GENCODE"].split(";")\n'
            '                   for f in ("-gencode", a)]\n')
    setup_py.write_text(text.replace(anchor, hook + anchor, 1))
    return True


def patch_mamba_init(init_py: Path) -> bool:
    """Wrap the package root's eager imports (Mamba-1, Mamba-3 modules) in `try/except ImportError`."""
    lines = init_py.read_text().splitlines()
    if INIT_GUARD.splitlines()[0] in lines:
        return True
    imports = [i for i, line in enumerate(lines) if line.startswith(("from ", "import "))]
    if not imports:
        return False
    first, last = imports[0], imports[-1]
    body = ["try:", *[f"    {line}" if line else "" for line in lines[first:last + 1]],
            "except ImportError:", "    pass"]
    init_py.write_text("\n".join([*lines[:first], *INIT_GUARD.splitlines(), *body, *lines[last + 1:]]) + "\n")
    return True


def _gencode() -> str | None:
    """nvcc's -gencode value for this machine's GPU (sm_90 on an H200), None without one."""
    code = ("import torch; c = torch.cuda.get_device_capability(); "
            "print(f'arch=compute_{c[0]}{c[1]},code=sm_{c[0]}{c[1]}')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def install_kernel(key: str, wheels: Path, log: Path) -> dict:
    ok, why = _importable(key)
    if ok:
        return {"action": "present", "detail": "imports"}
    name, version = KERNEL_SDISTS[key]
    sdist = wheels / f"{key}-{version}.tar.gz"
    if not sdist.is_file():
        return {"action": "failed", "detail": f"not importable ({why}) and {sdist} is missing: run "
                "`python bench/gpu_install.py fetch` where the package index is reachable, and carry bench/wheels"}
    env = {"MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 4))}
    with tempfile.TemporaryDirectory(prefix=f"h1tune-{key}-") as tmp:
        src = _unpack(sdist, Path(tmp))
        notes = []
        if key == "causal_conv1d":
            env["CAUSAL_CONV1D_FORCE_BUILD"] = "TRUE"
            gencode = os.environ.get("H1TUNE_NVCC_GENCODE") or _gencode()
            if gencode and patch_conv1d_archs(src / "setup.py"):
                env["H1TUNE_NVCC_GENCODE"] = gencode
                notes.append(f"nvcc -gencode {gencode}")
            else:
                notes.append("building upstream's nine architectures (no GPU seen, or setup.py changed)")
        else:
            env.update({"MAMBA_SKIP_CUDA_BUILD": "TRUE", "MAMBA_FORCE_BUILD": "TRUE"})
            if not patch_mamba_init(src / "mamba_ssm" / "__init__.py"):
                notes.append("mamba_ssm/__init__.py had no imports to guard")
        ok, out = _pip(["install", "--no-deps", "--no-build-isolation", "--no-index", "--no-compile", str(src)],
                       env=env, log=log)
    if not ok:
        return {"action": "failed", "detail": f"build failed: {_last_error(out)} (full log: {log})"}
    ok, why = _importable(key)
    if not ok:
        return {"action": "failed", "detail": f"installed but `{IMPORT_CHECKS[key]}` fails: {why}"}
    return {"action": "installed", "detail": f"{name} {version} from source; " + "; ".join(notes)}


def install(wheels: Path, report: Path | None, log: Path) -> int:
    """Packages first (transformers before anything imports it), then the two kernels; a line each."""
    results = {}
    jobs = [(f"pip:{g}", lambda g=g: install_group(g, wheels, log)) for g in GROUPS]
    jobs += [(key, lambda key=key: install_kernel(key, wheels, log)) for key in KERNEL_SDISTS]
    for name, job in jobs:
        start = time.perf_counter()
        results[name] = r = {**job(), "seconds": time.perf_counter() - start}
        print(f"  {name:<16} {r['action']:<9} {r['seconds']:6.1f}s  {r['detail']}", flush=True)
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(results, indent=2))
    return 1 if any(r["action"] == "failed" for r in results.values()) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download kernel sources, wheels and the Alpaca rows into --wheels")
    f.add_argument("--python-version", default="3.12", help="the GPU image's Python (KINDS.md: 3.12)")
    f.add_argument("--skip", action="append", default=[], choices=[*GROUPS, *KERNEL_SDISTS],
                   help="leave a group out (e.g. qlora: bitsandbytes is 41 MiB of the 64 MiB carry limit)")
    i = sub.add_parser("install", help="install what is missing from --wheels (idempotent)")
    i.add_argument("--report", type=Path, help="write the install results here as JSON")
    i.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "h1tune-gpu-install.log",
                   help="pip's full output (builds included)")
    for p in (f, i):
        p.add_argument("--wheels", type=Path, default=Path(os.environ.get("H1TUNE_WHEELS", WHEELS)))
    args = parser.parse_args(argv)
    if args.command == "fetch":
        return fetch(args.wheels, args.python_version, set(args.skip))
    return install(args.wheels, args.report, args.log)


if __name__ == "__main__":
    sys.exit(main())
