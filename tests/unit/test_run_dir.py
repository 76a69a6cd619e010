"""The output directory: refusal of other runs, complete-checkpoint markers, resume detection."""

import pytest

from h1tune.train import run_dir
from h1tune.config import load_config
from h1tune.errors import H1tuneError


def cfg_for(tmp_path, *overrides):
    return load_config(None, [f"output_dir={tmp_path / 'run'}", *overrides])


def test_refuses_a_foreign_non_empty_directory_unless_overwrite(tmp_path):
    cfg = cfg_for(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(H1tuneError, match="holds no h1tune run"):
        run_dir.prepare_output_dir(cfg)
    assert (tmp_path / "run" / "notes.txt").exists()
    assert run_dir.prepare_output_dir(cfg, overwrite=True) is None
    assert not (tmp_path / "run" / "notes.txt").exists()


def test_refuses_another_runs_directory_and_a_finished_run(tmp_path):
    cfg = cfg_for(tmp_path)
    run_dir.prepare_output_dir(cfg)
    other = cfg_for(tmp_path, "training.learning_rate=1e-5")
    with pytest.raises(H1tuneError, match="holds another run"):
        run_dir.prepare_output_dir(other)
    run_dir.mark_finished(cfg)
    with pytest.raises(H1tuneError, match="finished run"):
        run_dir.prepare_output_dir(cfg)


def test_only_checkpoints_with_the_marker_count_and_resume_picks_the_last(tmp_path):
    cfg = cfg_for(tmp_path)
    run_dir.prepare_output_dir(cfg)
    root = tmp_path / "run"
    for step in (5, 10):
        staged = root / ".staging" / f"checkpoint-{step}"
        staged.mkdir(parents=True)
        run_dir.publish_checkpoint(staged, root / f"checkpoint-{step}")
    (root / "checkpoint-15").mkdir()  # a crash mid-write: no marker
    assert [p.name for p in run_dir.complete_checkpoints(root)] == ["checkpoint-5", "checkpoint-10"]
    assert run_dir.prepare_output_dir(cfg) == root / "checkpoint-10"
    run_dir.rotate_checkpoints(root, keep=1)
    assert [p.name for p in run_dir.complete_checkpoints(root)] == ["checkpoint-10"]


def test_resume_without_a_run_is_an_error(tmp_path):
    with pytest.raises(H1tuneError, match="no run to resume"):
        run_dir.prepare_output_dir(cfg_for(tmp_path), resume=True)
