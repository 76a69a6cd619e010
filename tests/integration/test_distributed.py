"""Two DDP processes (gloo, CPU) train exactly what one process trains with gradient accumulation 2,
packing off and on; only rank 0 writes the run's files; rank 1 killed while checkpoint-6 is being
written leaves checkpoint-3 usable, and rerunning the command resumes from it to the same adapter.

The two-process run is launched for real: `h1tune train CONFIG --nproc 2` -> `accelerate launch` ->
torchrun -> 2 processes of `python -m h1tune.cli train`. 13 training examples at 2 per device make
an uneven last round, so the blank-row padding (train/sharding.py) is on the path, and 3 eval rows on
2 ranks make accelerate repeat one eval row, which H1Trainer.evaluate must drop.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import load_file

from h1tune.config import load_config
from h1tune.train.run_dir import complete_checkpoints
from h1tune.train.run import run_training

CONVERSATIONS = [("Say hello.", "Hello!"), ("Capital of France?", "Paris."), ("Count to three.", "One, two, three."),
                 ("Colour of the sky?", "Blue, mostly."), ("Two plus two?", "Four.")]
# gloo sums the two ranks' fp32 gradients in the order gradient accumulation adds the micro-batches,
# so the runs agree bit for bit today (measured max |Δ| 0.0); 1e-5 (the bound) leaves room for
# a reduction order that differs in the last bits, while a repeated or dropped row moves LoRA weights
# by ~1e-2 (measured 0.024 without the padding).
ATOL = 1e-5

# Records every file-system change that a process other than rank 0 makes under the run directory.
# Python-level writes only (open for writing, mkdir, rename, remove): h1tune's own files all go
# through them; weight files written by torch/safetensors natively are covered by the listing check.
AUDIT = textwrap.dedent("""
    import os, sys
    _root, _log, _rank = os.environ.get("H1TUNE_AUDIT_ROOT"), os.environ.get("H1TUNE_AUDIT_LOG"), os.environ.get("RANK")
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            if not (any(c in mode for c in "wax+") if isinstance(mode, str) else isinstance(flags, int) and flags & _WRITE):
                return
        elif event in ("os.rename", "os.replace"):
            path = args[1]
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
            path = args[0]
        else:
            return
        try:
            path = os.path.abspath(os.fsdecode(path))
        except TypeError:
            return
        if path.startswith(_root):
            with open(_log, "a") as f:
                f.write(f"{_rank} {event} {path}\\n")

    def _kill(event, args):  # rank 1 dies as it creates the named directory (mid-checkpoint)
        if event == "os.mkdir" and os.path.abspath(os.fsdecode(args[0])) == os.environ["H1TUNE_KILL_AT"]:
            os._exit(17)

    if _root and _log and _rank not in (None, "0"):
        sys.addaudithook(_hook)
    if os.environ.get("H1TUNE_KILL_AT") and _rank == "1":
        sys.addaudithook(_kill)
""")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in CONVERSATIONS]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 2 + rows[:3]))  # 13
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    return root


def write_config(path, tiny_dir, data, packing: bool):
    path.write_text(textwrap.dedent(f"""
        model: {{name_or_path: {tiny_dir}, dtype: float32}}
        data: {{train: {data / 'train.jsonl'}, eval: {data / 'eval.jsonl'}, max_length: 64, packing: {str(packing).lower()}}}
        adapter: {{lora_dropout: 0.0, probe: false}}
        training: {{learning_rate: 0.01, per_device_train_batch_size: 2, per_device_eval_batch_size: 2,
                   num_train_epochs: 2, logging_steps: 1, save_steps: 3, report_to: [none],
                   gradient_checkpointing: false}}
    """))
    return path


def launch_two(config, out, tmp_path, kill_at=None):
    """`h1tune train CONFIG --nproc 2`, rank 1's writes under `out` recorded by the audit hook."""
    (tmp_path / "audit").mkdir(exist_ok=True)
    (tmp_path / "audit" / "sitecustomize.py").write_text(AUDIT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path / "audit"),
           "H1TUNE_AUDIT_ROOT": str(out), "H1TUNE_AUDIT_LOG": str(tmp_path / "rank_writes.log")}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "H1TUNE_KILL_AT"):
        env.pop(name, None)
    if kill_at:
        env["H1TUNE_KILL_AT"] = str(kill_at)
    return subprocess.run([sys.executable, "-m", "h1tune.cli", "train", str(config), "--nproc", "2",
                           "--set", "training.distributed=ddp", "--set", f"output_dir={out}"],
                          env=env, capture_output=True, text=True, timeout=240)


def killed_then_resumed(config, out, tmp_path):
    """Rank 1 exits while checkpoint-6 is being staged; the same command then resumes from checkpoint-3."""
    killed = launch_two(config, out, tmp_path, kill_at=out / ".staging" / "checkpoint-6")
    assert killed.returncode == 2 and "Rerun the same command to resume" in killed.stderr, killed.stderr[-3000:]
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-3"] and not (out / "final").exists()
    done = launch_two(config, out, tmp_path)
    assert "resumed from step 3" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def listing(run_dir):
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_dir, data):
    """The reference: one process, gradient accumulation 2 (the same global batch), per packing setting."""
    runs = {}

    def run(packing: bool):
        if packing not in runs:
            root = tmp_path_factory.mktemp("one")
            config = write_config(root / "run.yaml", tiny_dir, data, packing)
            runs[packing] = config, run_training(load_config(config, ["training.gradient_accumulation_steps=2",
                                                                      f"output_dir={root / 'one'}"]))
        return runs[packing]

    return run


def assert_same_training(one, two_dir, stdout):
    a = load_file(one.final_dir / "adapter_model.safetensors")
    b = load_file(two_dir / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    delta = max((a[k] - b[k]).abs().max().item() for k in a)
    assert delta <= ATOL, f"max |Δ| {delta:.3g} between the 1-process and 2-process adapters"
    assert any(a[k].abs().max() > 1e-3 for k in a if "lora_B" in k), "the adapter trained"

    evals_one = [(r["step"], r["eval_loss"], r["eval_tokens"]) for r in records(one.output_dir) if "eval_loss" in r]
    evals_two = [(r["step"], r["eval_loss"], r["eval_tokens"]) for r in records(two_dir) if "eval_loss" in r]
    assert len(evals_one) >= 2 and [e[0] for e in evals_one] == [e[0] for e in evals_two]
    for (_, loss_one, tokens_one), (_, loss_two, tokens_two) in zip(evals_one, evals_two):
        assert tokens_two == tokens_one, "every eval token counted once across the two ranks"
        assert abs(loss_two - loss_one) <= 1e-6, (evals_one, evals_two)
    assert f"eval loss {one.eval_metrics['eval_loss']:.4f}" in stdout
    assert stdout.count(f"done: {one.steps} steps") == 1, "one process reports the run"


def assert_one_writer(one, two_dir, audit_log):
    """No line twice in metrics.jsonl; the same files as one process, plus each rank's own RNG state in
    each checkpoint; and rank 1 created, renamed or removed nothing under the run directory except the
    staged checkpoint directory the Trainer makes for that RNG file."""
    assert len(records(two_dir)) == len(records(one.output_dir))
    checkpoints = [p.name for p in sorted(one.output_dir.glob("checkpoint-*"))]
    assert checkpoints and checkpoints == [p.name for p in sorted(two_dir.glob("checkpoint-*"))]
    extra = sorted(set(listing(two_dir)) - set(listing(one.output_dir)))
    missing = sorted(set(listing(one.output_dir)) - set(listing(two_dir)))
    assert extra == sorted(f"{c}/rng_state_{r}.pth" for c in checkpoints for r in (0, 1)), extra
    assert missing == sorted(f"{c}/rng_state.pth" for c in checkpoints), missing
    writes = audit_log.read_text().splitlines() if audit_log.exists() else []
    unexpected = [w for w in writes if not (w.split()[1] == "os.mkdir" and w.split()[2].startswith(
        str(two_dir / ".staging")))]
    assert not unexpected, unexpected


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_two_ddp_processes_train_what_one_process_trains(tmp_path, one_process, packing):
    config, one = one_process(packing)
    done = launch_two(config, tmp_path / "two", tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-50000:]
    assert_same_training(one, tmp_path / "two", done.stdout)
    assert_one_writer(one, tmp_path / "two", tmp_path / "rank_writes.log")


def test_a_rank_killed_mid_checkpoint_leaves_the_last_one_and_the_rerun_resumes(tmp_path, one_process):
    config, one = one_process(False)
    done = killed_then_resumed(config, tmp_path / "two", tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-50000:]
    assert_same_training(one, tmp_path / "two", done.stdout)
    assert_one_writer(one, tmp_path / "two", tmp_path / "rank_writes.log")
