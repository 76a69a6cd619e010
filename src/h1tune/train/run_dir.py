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
from dataclasses import dataclass
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


@dataclass
class Claim:
    """An output directory this process now owns, and whether a failure may remove it."""

    root: Path
    resume_from: Path | None
    fresh: bool  # created (or started over) by this run: nothing of value inside until the first step
    created: Path | None = None  # the outermost directory this claim created (output_dir or a parent)
    started: bool = False  # set once the first optimiser step ends


def check_output_dir(cfg: H1tuneConfig, overwrite: bool = False, resume: bool | str = False) -> Path | None:
    """Decide, writing nothing, whether this run may use output_dir; return the checkpoint to resume from.

    Cheap, so `train` runs it before the data checks. An empty or new directory is free. One that
    holds this same run (same config, or the resolved config it saved) resumes from its last complete
    checkpoint, or from the one `resume` names. Anything else is refused unless `overwrite`.
    """
    root = Path(cfg.output_dir)
    check_output_path(root)
    if overwrite or not root.exists() or not any(root.iterdir()):
        if resume and not overwrite:
            raise H1tuneError(f"--resume: {str(root)!r} holds no run to resume")
        return None
    run_file = root / RUN_FILE
    if not run_file.is_file():
        raise H1tuneError(f"output_dir {str(root)!r} is not empty and holds no h1tune run; choose another "
                          "output_dir or pass --overwrite to replace its contents")
    previous = json.loads(run_file.read_text())
    same = config_fingerprint(cfg) in (previous.get("fingerprint"), previous.get("resolved_fingerprint"))
    if not same and not resume:
        raise H1tuneError(f"output_dir {str(root)!r} holds another run (its config differs); choose another "
                          "output_dir, pass --overwrite to replace it, or --resume to continue it anyway")
    if previous.get("finished") and not resume:
        raise H1tuneError(f"output_dir {str(root)!r} holds a finished run; pass --overwrite to train again")
    if isinstance(resume, str):
        return _named_checkpoint(root, Path(resume))
    checkpoints = complete_checkpoints(root)
    if checkpoints:
        return checkpoints[-1]
    if resume:
        raise H1tuneError(f"--resume: {str(root)!r} has no complete checkpoint to resume from")
    return None


def check_output_path(root: Path) -> None:
    """output_dir must be a directory or creatable as one: not a file, nor under one (`check` runs this too)."""
    for path in [root, *root.parents]:
        if path.exists() and not path.is_dir():
            where = "is a file" if path == root else f"is under {str(path)!r}, which is a file"
            raise H1tuneError(f"output_dir: {str(root)!r} {where}; set output_dir to a directory (new or "
                              "empty, or one holding this run); nothing was written")


def _named_checkpoint(root: Path, named: Path) -> Path:
    """`--resume CHECKPOINT`: a complete checkpoint of this run (a name inside output_dir, or a path)."""
    path = named if named.is_absolute() or named.exists() else root / named
    complete = {p.resolve() for p in complete_checkpoints(root)}
    if path.resolve() not in complete:
        names = ", ".join(p.name for p in complete_checkpoints(root)) or "none"
        raise H1tuneError(f"--resume: {str(named)!r} is not a complete checkpoint of {str(root)!r} "
                          f"(complete ones: {names})")
    return path


def claim_output_dir(cfg: H1tuneConfig, overwrite: bool = False, resume: bool | str = False,
                     resolved: H1tuneConfig | None = None) -> Claim:
    """Check, then take the output dir: write the run marker, or prepare the resume."""
    root = Path(cfg.output_dir)
    resume_from = check_output_dir(cfg, overwrite=overwrite, resume=resume)
    if overwrite and root.exists():
        entries = sorted(p.name for p in root.iterdir())
        log.info("--overwrite: removing %s (%d entries: %s%s)", root, len(entries), ", ".join(entries[:8]),
                 " ..." if len(entries) > 8 else "")
        shutil.rmtree(root)
    if resume_from is not None:
        log.info("resuming from %s (last complete checkpoint)", resume_from)
        _trim_metrics(root, int(resume_from.name.split("-")[1]))
    else:
        _trim_metrics(root, 0)
    created = next((p for p in [*reversed(root.absolute().parents), root.absolute()] if not p.exists()), None)
    root.mkdir(parents=True, exist_ok=True)
    write_run_marker(root / RUN_FILE, cfg, resolved, finished=False)
    return Claim(root, resume_from, fresh=resume_from is None, created=created)


def release_failed(claim: Claim) -> None:
    """A run that fails before its first step leaves nothing behind, so the corrected rerun starts clean."""
    if claim.fresh and not claim.started and claim.root.exists():
        shutil.rmtree(claim.created or claim.root, ignore_errors=True)
        log.info("removed %s: the run stopped before its first step", claim.created or claim.root)


def prepare_output_dir(cfg: H1tuneConfig, overwrite: bool = False, resume: bool | str = False) -> Path | None:
    """Claim the output dir; return the checkpoint to resume from, if any."""
    return claim_output_dir(cfg, overwrite=overwrite, resume=resume).resume_from


def _trim_metrics(root: Path, last_step: int) -> None:
    """Forget metrics logged after `last_step`: the resumed run logs those steps again."""
    path = root / METRICS_FILE
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def mark_finished(cfg: H1tuneConfig, resolved: H1tuneConfig | None = None) -> None:
    write_run_marker(Path(cfg.output_dir) / RUN_FILE, cfg, resolved, finished=True)


def write_run_marker(path: Path, cfg: H1tuneConfig, resolved: H1tuneConfig | None, finished: bool) -> None:
    """The run marker: the config's fingerprint, and that of the resolved config saved beside it, so a
    rerun with either (`h1tune train OUTPUT_DIR/config.yaml`) is the same run."""
    state = {"fingerprint": config_fingerprint(cfg), "finished": finished}
    if resolved is not None:
        state["resolved_fingerprint"] = config_fingerprint(resolved)
    write_text_atomic(path, json.dumps(state))


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
