"""Publish files and directories atomically: a crash never leaves a half-written one in place.

    write_text_atomic(run / "h1tune_run.json", json.dumps(state))
    publish_dir(staged_dir, run / "final")        # one rename; an old `final` goes only afterwards

Everything h1tune writes for a user to rely on (configs, run markers, checkpoints, merged models,
preset caches) goes through these two functions.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to a temporary sibling, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def publish_file(staged: str | Path, destination: str | Path) -> Path:
    """Move a fully written (and checked) file into place with one rename; stage it on the same
    filesystem (beside `destination`) so that the rename is atomic."""
    staged, destination = Path(staged), Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staged.replace(destination)
    return destination


def publish_dir(staged: str | Path, destination: str | Path) -> Path:
    """Move a fully written directory into place with one rename.

    An existing `destination` is first renamed aside and removed only after the new one is in
    place, so at every moment either the old or the new directory is complete.
    """
    staged, destination = Path(staged), Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    trash = None
    if destination.exists():
        trash = destination.with_name(f".{destination.name}.old-{os.getpid()}")
        shutil.rmtree(trash, ignore_errors=True)
        destination.replace(trash)
    staged.replace(destination)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return destination
