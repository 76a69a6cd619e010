"""DPO and KTO end to end on the tiny model: margin and accuracy rise, SFT -> DPO through the CLI
with the SFT model as reference, resume == uninterrupted, full fine-tuning's frozen reference,
the tii_dpo schedule, and objective/data mismatches refused."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from h1tune.cli import main
from h1tune.config import load_config
from h1tune.train.run_dir import complete_checkpoints
from h1tune.train.run import run_training

FIXTURES = Path(__file__).parents[1] / "fixtures" / "data"


@pytest.fixture(scope="module")
def separable_file(tmp_path_factory):
    """Eight prompts, always the same preferred and dispreferred style: a set DPO can separate."""
    rows = [{"prompt": f"Question {i}: is this fine?", "chosen": "Yes, certainly.", "rejected": "No way."}
            for i in range(8)]
    path = tmp_path_factory.mktemp("data") / "separable.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp_path, data_file, tiny_dir, *overrides):
    return load_config(None, [
        f"model.name_or_path={tiny_dir}", f"data.train={data_file}", "data.max_length=128",
        "adapter.lora_dropout=0.0", "training.objective=dpo", "training.learning_rate=5e-3",
        "training.per_device_train_batch_size=4", "training.max_steps=8", "training.logging_steps=1",
        "training.save_steps=4", "training.report_to=[none]", f"output_dir={tmp_path / 'run'}", *overrides])


def metrics(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def test_margin_and_accuracy_rise_on_a_separable_set(tmp_path, separable_file, tiny_dir):
    result = run_training(config(tmp_path, separable_file, tiny_dir, f"data.eval={separable_file}",
                                 "training.eval_steps=8", "data.packing=true"))
    train = [r for r in metrics(result.output_dir) if "rewards/margins" in r]
    assert train[0]["rewards/margins"] == 0.0 and train[0]["rewards/accuracies"] == 0.0  # policy == reference
    assert train[-1]["loss"] < train[0]["loss"] - 0.1
    final = result.eval_metrics
    assert final["eval_rewards/accuracies"] == 1.0 and final["eval_rewards/margins"] > 0.5, final
    assert (result.output_dir / "rewards_curve.png").stat().st_size > 1000
    assert not (result.final_dir / "ref").exists()


def test_sft_then_dpo_from_the_sft_adapter_through_the_cli(tmp_path, separable_file, tiny_dir, capsys):
    sft = {"model": {"name_or_path": str(tiny_dir)}, "data": {"train": str(FIXTURES / "messages.jsonl")},
           "adapter": {"r": 8, "lora_dropout": 0.0},
           "training": {"learning_rate": 1e-2, "max_steps": 4, "per_device_train_batch_size": 2,
                        "report_to": ["none"]},
           "output_dir": str(tmp_path / "sft")}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft))
    assert main(["train", str(tmp_path / "sft.yaml")]) == 0
    sft_adapter = load_file(tmp_path / "sft" / "final" / "adapter_model.safetensors")
    assert any(v.abs().max() > 0 for k, v in sft_adapter.items() if "lora_B" in k), "SFT trained its adapter"

    dpo = {"model": {"name_or_path": str(tiny_dir), "adapter": str(tmp_path / "sft" / "final")},
           "data": {"train": str(separable_file), "eval": str(separable_file)}, "adapter": {"lora_dropout": 0.0},
           "training": {"objective": "dpo", "recipe": "tii_dpo", "learning_rate": 1e-3, "max_steps": 3,
                        "per_device_train_batch_size": 4, "logging_steps": 1, "report_to": ["none"]},
           "output_dir": str(tmp_path / "dpo")}
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(dpo))
    assert main(["train", str(tmp_path / "dpo.yaml")]) == 0
    out = capsys.readouterr().out
    assert "preference data (objective dpo)" in out and "reward margin" in out and "preference accuracy" in out

    first = next(r for r in metrics(tmp_path / "dpo") if "rewards/chosen" in r)
    # the reference is the SFT model (its adapter, frozen): at step 1 policy == reference exactly
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    final = tmp_path / "dpo" / "final"
    dpo_adapter = load_file(final / "adapter_model.safetensors")
    assert dpo_adapter.keys() == sft_adapter.keys()  # the same adapter kept training
    assert any(not torch.equal(dpo_adapter[k], sft_adapter[k]) for k in sft_adapter)
    assert json.loads((final / "adapter_config.json").read_text())["r"] == 8
    assert not (final / "ref").exists(), "the frozen reference copy is not part of the result"


def test_dpo_resume_equals_an_uninterrupted_run(tmp_path, separable_file, tiny_dir, stop_after_save):
    run_training(config(tmp_path / "a", separable_file, tiny_dir))
    interrupted = config(tmp_path / "b", separable_file, tiny_dir)
    with pytest.raises(KeyboardInterrupt):
        run_training(interrupted, callbacks=[stop_after_save(4)])
    assert [p.name for p in complete_checkpoints(tmp_path / "b" / "run")] == ["checkpoint-4"]
    resumed = run_training(interrupted)
    assert resumed.steps == 8
    a = load_file(tmp_path / "a" / "run" / "final" / "adapter_model.safetensors")
    b = load_file(resumed.final_dir / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_kto_runs_on_unpaired_data(tmp_path, tiny_dir):
    result = run_training(config(tmp_path, FIXTURES / "kto_messages.jsonl", tiny_dir, "training.objective=kto",
                                 "training.max_steps=3"))
    logged = [r for r in metrics(result.output_dir) if "kl" in r]
    assert len(logged) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in logged)
    assert "rewards/chosen" in logged[0] and "rewards/rejected" in logged[0]
    assert (result.final_dir / "adapter_model.safetensors").is_file()


def test_full_fine_tuning_dpo_trains_against_a_frozen_copy(tmp_path, separable_file, tiny_dir):
    result = run_training(config(tmp_path, separable_file, tiny_dir, "adapter.method=full", "training.max_steps=2",
                                 "training.learning_rate=1e-4", "training.warmup_ratio=0"))
    before = load_file(str(tiny_dir / "model.safetensors"))
    after = load_file(str(next(result.final_dir.glob("*.safetensors"))))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    second = [r for r in metrics(result.output_dir) if "rewards/margins" in r][1]
    assert second["rewards/margins"] != 0.0  # the reference stayed where the policy started


class ScheduleSpy(TrainerCallback):
    def on_train_end(self, args, state, control, lr_scheduler=None, **kwargs):
        self.max_steps, self.last_lr = state.max_steps, lr_scheduler.get_last_lr()[0]


def test_tii_dpo_stops_after_one_epoch_of_a_two_epoch_schedule(tmp_path, separable_file, tiny_dir):
    spy = ScheduleSpy()
    result = run_training(config(tmp_path, separable_file, tiny_dir, "training.recipe=tii_dpo",
                                 "training.max_steps=-1", "training.num_train_epochs=1",
                                 "training.learning_rate=null"), callbacks=[spy])  # the recipe's 5e-6
    assert result.steps == 2 and spy.max_steps == 4  # 8 pairs, 4 per step: one epoch of a two-epoch schedule
    # linear decay with 1 warmup step over 4 steps: after 2 steps 5e-6 * 2/3 is left (a 1-epoch schedule: 0)
    assert spy.last_lr == pytest.approx(5e-6 * 2 / 3, rel=1e-6)


@pytest.mark.parametrize("objective, data, hint", [
    ("sft", "preference_sharegpt_ranking.json", "training.objective: dpo"),
    ("sft", "kto_messages.jsonl", "training.objective: kto"),
    ("dpo", "messages.jsonl", "training.objective: sft"),
    ("dpo", "kto_messages.jsonl", "training.objective: kto"),
])
def test_objective_and_data_mismatch_is_refused_by_check(tmp_path, tiny_dir, capsys, objective, data, hint):
    cfg = {"model": {"name_or_path": str(tiny_dir)}, "data": {"train": str(FIXTURES / data)},
           "training": {"objective": objective}, "output_dir": str(tmp_path / "run")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["check", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and hint in err and "Traceback" not in err
