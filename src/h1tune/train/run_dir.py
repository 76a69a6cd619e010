"""The output directory of a training run: who owns it, which checkpoints are complete, resume.

A run directory holds `h1tune_run.json` (the hash of the resolved config). A checkpoint counts
only once it carries `h1tune_complete` — written after every file and moved into place with a
rename — so a crash mid-write never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

from h1tune.atomic import publish_dir, write_text_atomic
from h1tune.config import H1tuneConfig
from h1tune.errors import H1tuneError

log = logging.getLogger("h1tune")

RUN_FILE = "h1tune_run.json"
COMPLETE_MARKER = "h1tune_complete"
FINAL_DIR = "final"
METRICS_FILE = "metrics.jsonl"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def config_fingerprint(cfg: H1tuneConfig) -> str:
    """What makes two runs the same run (the output directory itself excluded)."""
    tree = cfg.model_dump(mode="json")
    tree.pop("output_dir", None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _CHECKPOINT.match(p.name)) and (p / COMPLETE_MARKER).is_file()]
    return [p for _, p in sorted(found)]


def prepare_output_dir(cfg: H1tuneConfig, overwrite: bool = False, resume: bool = False) -> Path | None:
    """Create or claim the output dir; return the checkpoint to resume from, if any.

    An empty or new directory is claimed. One that holds this same run (same config) resumes
    from its last complete checkpoint. Anything else is refused unless `overwrite`.
    """
    root = Path(cfg.output_dir)
    fingerprint = config_fingerprint(cfg)
    run_file = root / RUN_FILE
    if overwrite and root.exists():
        shutil.rmtree(root)
    if root.exists() and any(root.iterdir()):
        if not run_file.is_file():
            raise H1tuneError(f"output_dir {str(root)!r} is not empty and holds no h1tune run; choose another "
                              "output_dir or pass --overwrite to replace its contents")
        previous = json.loads(run_file.read_text())
        if previous.get("fingerprint") != fingerprint and not resume:
            raise H1tuneError(f"output_dir {str(root)!r} holds another run (its config differs); choose another "
                              "output_dir, pass --overwrite to replace it, or --resume to continue it anyway")
        if previous.get("finished") and not resume:
            raise H1tuneError(f"output_dir {str(root)!r} holds a finished run; pass --overwrite to train again")
        checkpoints = complete_checkpoints(root)
        if checkpoints:
            log.info("resuming from %s (last complete checkpoint)", checkpoints[-1])
            _write_run_file(run_file, fingerprint, finished=False)
            _trim_metrics(root, int(checkpoints[-1].name.split("-")[1]))
            return checkpoints[-1]
        if resume:
            raise H1tuneError(f"--resume: {str(root)!r} has no complete checkpoint to resume from")
        _trim_metrics(root, 0)
    elif resume:
        raise H1tuneError(f"--resume: {str(root)!r} holds no run to resume")
    root.mkdir(parents=True, exist_ok=True)
    _write_run_file(run_file, fingerprint, finished=False)
    return None


def _trim_metrics(root: Path, last_step: int) -> None:
    """Forget metrics logged after `last_step`: the resumed run logs those steps again."""
    path = root / METRICS_FILE
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def mark_finished(cfg: H1tuneConfig) -> None:
    _write_run_file(Path(cfg.output_dir) / RUN_FILE, config_fingerprint(cfg), finished=True)


def _write_run_file(path: Path, fingerprint: str, finished: bool) -> None:
    write_text_atomic(path, json.dumps({"fingerprint": fingerprint, "finished": finished}))


def publish_checkpoint(staged: Path, destination: Path) -> None:
    """Mark a fully written checkpoint complete and move it into place with one rename."""
    (staged / COMPLETE_MARKER).write_text("")
    publish_dir(staged, destination)


def rotate_checkpoints(output_dir: str | Path, keep: int | None) -> None:
    """Delete the oldest complete checkpoints beyond `keep`."""
    if keep is None:
        return
    for old in complete_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
