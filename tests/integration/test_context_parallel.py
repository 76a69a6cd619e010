"""Context parallelism is exact: two gloo processes, each running the model on half of one packed row,
give the loss and (summed) LoRA gradients of one process running the whole row (CPU, fp32).

The row (2,049 tokens, padded to 2,050 by the split) has a document spanning the slice boundary and
long-memory Mamba mixers (|A| in [0.01, 0.1], dt_bias -3, chunk 16), so a state or conv halo lost at
the boundary shows in the gradients; the control (carry=False) drops exactly those and must fail.
The CP run uses gradient checkpointing, so the collectives also run in the backward's re-forward.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from h1tune import context_parallel as cp
from h1tune import ssm
from h1tune.data.packing import collate_packed
from h1tune.presets import FAKE_ADAPTER_TARGETS, build_model, long_memory

TOL = dict(atol=1e-5, rtol=1e-5)
# LoRA gradients here are 3e-4 .. 2e-2 at their largest, so a plain atol of 1e-5 would pass a small
# tensor that is wholly wrong: each tensor is held to 2e-5 of its own largest entry (measured 3e-6;
# the control is off by 0.67 of it).
GRAD_SCALE = 2e-5
# 2,049 tokens: the boundary at 1,025 falls inside the 700-token document (starts at 712)
LENGTHS = [300, 412, 700, 9, 628]
WORLD = 2


def make_model():
    """The long-memory tiny model with LoRA on attention, in_proj and MLP (random lora_B, so every
    LoRA weight gets a gradient)."""
    from peft import LoraConfig, get_peft_model

    model = long_memory(build_model("tiny", seed=0, mamba_chunk_size=16, initializer_range=0.1,
                                    lm_head_multiplier=1.0, ssm_out_multiplier=1.0))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=FAKE_ADAPTER_TARGETS, lora_dropout=0.0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return model.train()


def make_batch():
    gen = torch.Generator().manual_seed(0)
    return collate_packed([{"input_ids": torch.randint(5, 1000, (n,), generator=gen).tolist()} for n in LENGTHS])


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _cp_step(model, mine, carry: bool):
    """One CP forward/backward on this rank's slice; returns the row's loss and the summed LoRA grads."""
    model.zero_grad()
    with cp.enabled(dist.group.WORLD, model=model, carry=carry):
        logits = model(input_ids=mine["input_ids"], position_ids=mine["position_ids"], seq_idx=mine["seq_idx"],
                       use_cache=False).logits
        loss = cp.token_loss(logits, mine["shift_labels"], mine["num_items_in_batch"])
        loss.backward()
    grads = lora_grads(model)
    for grad in grads.values():
        dist.all_reduce(grad)
    row_loss = loss.detach().clone()
    dist.all_reduce(row_loss)
    return row_loss, grads


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = make_model()
        mine = cp.split_packed_batch(make_batch(), WORLD)[rank]
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        results = {"cp": _cp_step(model, mine, carry=True)}
        model.gradient_checkpointing_disable()
        results["control"] = _cp_step(model, mine, carry=False)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one-process loss and grads, CP results from the two ranks)."""
    ssm.install()
    model = make_model()
    batch = make_batch()
    assert batch["input_ids"].shape[1] >= 2048
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    reference = (loss.detach(), lora_grads(model))
    del model

    tmp = tmp_path_factory.mktemp("cp")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return reference, torch.load(tmp / "results.pt")


def test_split_puts_a_document_across_the_boundary():
    first, second = (s["seq_idx"] for s in cp.split_packed_batch(make_batch(), WORLD))
    assert first[0, -1] == second[0, 0] and first[0, 0] != first[0, -1]


def test_context_parallel_loss_and_gradients_equal_one_process(runs):
    (loss, grads), results = runs
    cp_loss, cp_grads = results["cp"]
    torch.testing.assert_close(cp_loss, loss, **TOL)
    assert grads.keys() == cp_grads.keys() and len(grads) > 20
    assert all(g.abs().max() > 0 for g in grads.values())
    for name, grad in grads.items():
        assert_grad_close(cp_grads[name], grad, name)


def assert_grad_close(got, want, name):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=GRAD_SCALE * want.abs().max().item(), msg=name)


def test_without_the_carried_state_and_halo_the_gradients_differ(runs):
    """Control: the comparison above would catch a lost state or halo at the slice boundary."""
    (_, grads), results = runs
    _, control = results["control"]
    with pytest.raises(AssertionError):
        for name, grad in grads.items():
            assert_grad_close(control[name], grad, name)
    worst = max(((control[n] - g).abs().max() / g.abs().max()).item() for n, g in grads.items())
    assert worst > 0.1, worst


def test_a_context_parallel_training_run_trains_what_one_process_trains(tmp_path, tiny_dir):
    """`h1tune train --nproc 2` with training.context_parallel 2: every packed row split over the two ranks,
    4 steps, an eval; the adapter, the logged losses and the eval equal one process on whole rows."""
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file

    from h1tune.config import load_config
    from h1tune.train import run_training

    words = "the quick brown fox jumps over a lazy dog while seven small birds sing".split()
    rows = [{"messages": [{"role": "user", "content": " ".join(words[: 3 + i % 9])},
                          {"role": "assistant", "content": " ".join(words[i % 5:][: 4 + i % 11])}]} for i in range(24)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    (tmp_path / "cp.yaml").write_text(
        f"model: {{name_or_path: {tiny_dir}, dtype: float32}}\n"
        f"data: {{train: {tmp_path / 'train.jsonl'}, eval: {tmp_path / 'eval.jsonl'}, max_length: 128, packing: true}}\n"
        "adapter: {lora_dropout: 0.0, probe: false}\n"
        "training: {learning_rate: 0.01, per_device_train_batch_size: 2, max_steps: 4, eval_steps: 4, logging_steps: 1,"
        " save_steps: 100, report_to: [none], gradient_checkpointing: false, distributed: ddp}\n")
    one = run_training(load_config(tmp_path / "cp.yaml", [f"output_dir={tmp_path / 'one'}"]))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    done = subprocess.run([sys.executable, "-m", "h1tune.cli", "train", str(tmp_path / "cp.yaml"), "--nproc", "2",
                           "--set", "training.context_parallel=2", "--set", f"output_dir={tmp_path / 'two'}"],
                          env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-5000:]
    assert "each packed row split over 2 ranks" in done.stderr  # and with carry=False the adapters differ by 0.03
    a = load_file(one.final_dir / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(a[k].abs().max() > 1e-3 for k in a if "lora_B" in k)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5

    def logged(run):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if "loss" in r], [r["eval_loss"] for r in records if "eval_loss" in r]

    (losses_one, evals_one), (losses_two, evals_two) = logged(one.output_dir), logged(tmp_path / "two")
    assert len(losses_one) == 4 and losses_two == pytest.approx(losses_one, abs=1e-5)
    assert len(evals_one) == 1 and evals_two == pytest.approx(evals_one, abs=1e-5)  # whole rows; adapters 3e-6 apart
