"""Where a merged or exported model goes: never into its inputs, never over work without asking,
and only when the whole of it fits on the disk."""

from __future__ import annotations

import shutil
from pathlib import Path

from h1tune.errors import H1tuneError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_out_dir(out_dir: Path, protected: list[Path], overwrite: bool) -> None:
    """Refuse to write into (or over) the base or adapter, or over a non-empty directory unless asked."""
    out = out_dir.resolve()
    for p in protected:
        p = p.resolve()
        if _inside(out, p):
            raise H1tuneError(f"out_dir: {out_dir} is inside {p}, which is an input of this merge; "
                              "choose a directory outside the base model and the adapter")
        if _inside(p, out):
            raise H1tuneError(f"out_dir: {out_dir} contains {p}, an input of this merge; writing there "
                              "(or --overwrite) would destroy it; choose another directory")
    if out.exists() and not out.is_dir():
        raise H1tuneError(f"out_dir: {out_dir} exists and is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise H1tuneError(f"out_dir: {out_dir} is not empty; choose another directory or pass overwrite=True "
                          "(--overwrite) to replace it")


def check_disk_space(out_dir: Path, needed: int) -> None:
    """The merged checkpoint is written before anything is removed, so all of it must fit."""
    parent = out_dir.resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise H1tuneError(f"out_dir: {parent} has {free / 2**30:.2f} GiB free; the merged checkpoint needs about "
                          f"{needed / 2**30:.2f} GiB. Free space, choose another disk, or a smaller --dtype")


def estimate_size(base_path: str, base_dtype: str, out_dtype: str) -> int | None:
    """Bytes of the merged safetensors, scaled from the base's files (None for a hub id not on disk)."""
    files = list(Path(base_path).glob("*.safetensors")) if Path(base_path).is_dir() else []
    if not files:
        return None
    size = sum(f.stat().st_size for f in files)
    scale = DTYPE_BYTES[out_dtype] / DTYPE_BYTES.get(base_dtype, 4)
    return int(size * scale * 1.05) + (64 << 20)  # headroom: headers, tokenizer, filesystem rounding
