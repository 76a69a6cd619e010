"""SFT end to end on the tiny model: loss falls, only LoRA changes, the adapter loads with plain
peft, resume equals an uninterrupted run, output-dir refusal, NaN stop."""

import json

import pytest
import torch
from safetensors.torch import load_file

from h1tune.config import load_config
from h1tune.errors import H1tuneError
from h1tune.train.run_dir import complete_checkpoints
from h1tune.train.run import run_training


@pytest.fixture(scope="module")
def memorise_file(tmp_path_factory):
    """Three short conversations, repeated: a set a tiny model can memorise in a few steps."""
    rows = [
        {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]},
        {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]},
        {"messages": [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two, three."}]},
    ]
    path = tmp_path_factory.mktemp("data") / "memorise.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    return path


def config(tmp_path, data_file, tiny_dir, *overrides):
    return load_config(None, [
        f"model.name_or_path={tiny_dir}", f"data.train={data_file}", "data.max_length=64",
        "adapter.lora_dropout=0.0", "training.learning_rate=1e-2", "training.per_device_train_batch_size=4",
        "training.max_steps=8", "training.logging_steps=1", "training.save_steps=4", "training.report_to=[none]",
        f"output_dir={tmp_path / 'run'}", *overrides])


def test_lora_sft_learns_changes_only_lora_and_loads_with_plain_peft(tmp_path, memorise_file, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = config(tmp_path, memorise_file, tiny_dir, "training.max_steps=12", "adapter.probe=true")
    result = run_training(cfg)
    losses = [r["loss"] for r in map(json.loads, (result.output_dir / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses
    assert (result.output_dir / "loss_curve.png").stat().st_size > 1000
    assert (result.final_dir / "config.yaml").is_file() and (result.final_dir / "tokenizer.json").is_file()

    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    adapter = load_file(result.final_dir / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert not any("conv1d" in k or "out_proj" in k for k in adapter)
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k), "every lora_B trained"

    ids = torch.tensor([[1, 3, 50, 60, 70, 4, 3, 80, 90]])
    with torch.no_grad():
        base_logits = base(ids).logits
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), result.final_dir).eval()
        tuned_logits = tuned(ids).logits
        reloaded = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    assert (tuned_logits - base_logits).abs().max() > 1e-3, "the adapter changes the logits"
    for (name, p), (_, q) in zip(base.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(p, q), f"base weight {name} changed on disk"
    for name, p in tuned.named_parameters():
        if "lora_" not in name:
            original = dict(base.named_parameters())[name.replace("base_model.model.", "").replace(".base_layer", "")]
            assert torch.equal(p, original), f"base parameter {name} changed"


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path, memorise_file, tiny_dir, stop_after_save):
    straight = config(tmp_path / "a", memorise_file, tiny_dir, "adapter.lora_dropout=0.1")
    run_training(straight)

    interrupted = config(tmp_path / "b", memorise_file, tiny_dir, "adapter.lora_dropout=0.1")
    with pytest.raises(KeyboardInterrupt):
        run_training(interrupted, callbacks=[stop_after_save(4)])
    assert [p.name for p in complete_checkpoints(tmp_path / "b" / "run")] == ["checkpoint-4"]
    resumed = run_training(interrupted)  # same config: resumes automatically
    assert resumed.steps == 8

    steps = [r["step"] for r in map(json.loads, (resumed.output_dir / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == sorted(set(steps)) == list(range(1, 9)), "each step logged once across the resume"

    a = load_file(tmp_path / "a" / "run" / "final" / "adapter_model.safetensors")
    b = load_file(resumed.final_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst


def test_refuses_an_output_dir_that_holds_another_run(tmp_path, memorise_file, tiny_dir):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.bin").write_bytes(b"x")
    with pytest.raises(H1tuneError, match="--overwrite"):
        run_training(config(tmp_path, memorise_file, tiny_dir))
    assert (tmp_path / "run" / "precious.bin").read_bytes() == b"x"


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, memorise_file, tiny_dir, monkeypatch):
    from h1tune.train import trainer as train

    real_step = train.Trainer.training_step

    def poisoned(self, model, inputs, num_items_in_batch=None):
        loss = real_step(self, model, inputs, num_items_in_batch)
        return loss * float("nan") if self.state.global_step >= 5 else loss

    monkeypatch.setattr(train.Trainer, "training_step", poisoned)
    with pytest.raises(H1tuneError, match="loss became nan at step 6"):
        run_training(config(tmp_path, memorise_file, tiny_dir))
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == ["checkpoint-4"]
    assert not (tmp_path / "run" / "final").exists()


def test_eval_loss_is_the_same_with_packing_on_and_off(tmp_path, memorise_file, tiny_dir):
    """Token-weighted eval: the reported loss depends on neither batching nor padding. A 1e-12
    learning rate keeps the model fixed while the whole run (probe, train, eval) executes."""
    common = ["training.learning_rate=1e-12", "training.max_steps=1", f"data.eval={memorise_file}"]
    packed = run_training(config(tmp_path / "p", memorise_file, tiny_dir, *common, "data.packing=true",
                                 "training.per_device_eval_batch_size=2"))
    padded = run_training(config(tmp_path / "u", memorise_file, tiny_dir, *common, "data.packing=false",
                                 "training.per_device_eval_batch_size=5"))
    assert packed.eval_metrics["eval_tokens"] == padded.eval_metrics["eval_tokens"] > 0
    assert packed.eval_metrics["eval_loss"] == pytest.approx(padded.eval_metrics["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("overrides", [
    ["adapter.method=full", "adapter.freeze=[embeddings]"],
    ["model.quantization=4bit"],
], ids=["full", "qlora"])
def test_packed_training_runs_with_full_fine_tuning_and_qlora(tmp_path, memorise_file, tiny_dir, overrides):
    result = run_training(config(tmp_path, memorise_file, tiny_dir, "data.packing=true", "training.max_steps=2",
                                 "training.learning_rate=1e-4", *overrides))
    assert result.steps == 2 and result.train_loss is not None and torch.isfinite(torch.tensor(result.train_loss))
    assert (result.final_dir / "config.yaml").is_file()


def test_full_fine_tuning_run_moves_every_trainable_weight_and_no_frozen_one(tmp_path, memorise_file, tiny_dir):
    result = run_training(config(tmp_path, memorise_file, tiny_dir, "adapter.method=full",
                                 "adapter.freeze=[embeddings]", "training.max_steps=2", "training.learning_rate=1e-4"))
    before = load_file(str(tiny_dir / "model.safetensors"))
    after = load_file(str(next(result.final_dir.glob("*.safetensors"))))
    assert before.keys() == after.keys()
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved == set(before) - {"model.embed_tokens.weight"}


def test_check_and_train_share_one_seeded_preflight(tmp_path, memorise_file, tiny_dir):
    """`check` must probe the LoRA initialisation `train` trains: the same seed before apply_adapter."""
    from h1tune.train.preflight import check_inputs, prepare_model

    cfg = config(tmp_path, memorise_file, tiny_dir)
    inputs = check_inputs(cfg, show=lambda _: None)
    first, second = (prepare_model(cfg, inputs, probe=False).model for _ in range(2))
    a = {n: p for n, p in first.named_parameters() if "lora_A" in n}
    b = {n: p for n, p in second.named_parameters() if "lora_A" in n}
    assert a and all(torch.equal(a[n], b[n]) for n in a)


def test_bf16_lora_run_keeps_a_bf16_base_and_fp32_adapters_and_learns(tmp_path, memorise_file, tiny_dir):
    """What `dtype: auto` chooses on a CPU with native bf16 (forced here so any CPU runs it)."""
    result = run_training(config(tmp_path, memorise_file, tiny_dir, "model.dtype=bfloat16", "training.max_steps=10",
                                 "training.learning_rate=5e-3"))
    losses = [r["loss"] for r in map(json.loads, (result.output_dir / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert losses[-1] < losses[0]
    adapter = load_file(str(result.final_dir / "adapter_model.safetensors"))
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())


def test_gradient_checkpointing_trains_the_same_adapter(tmp_path, memorise_file, tiny_dir):
    """Checkpointing (reentrant on one process) only trades memory for recompute: the same adapter."""
    runs = [run_training(config(tmp_path / name, memorise_file, tiny_dir, f"training.gradient_checkpointing={flag}",
                                "training.max_steps=3"))
            for name, flag in (("plain", "false"), ("ckpt", "true"))]
    plain, ckpt = (load_file(str(r.final_dir / "adapter_model.safetensors")) for r in runs)
    assert plain.keys() == ckpt.keys()
    assert max((plain[k] - ckpt[k]).abs().max().item() for k in plain) < 1e-6
    assert any(plain[k].abs().sum() > 0 for k in plain if "lora_B" in k)  # it trained
