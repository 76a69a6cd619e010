"""OUMI's 0.5B recipes run unchanged through `h1tune train`, offline: the model pointed at the tiny
preset and the data at local files with --set; the job is OUMI's (its learning rate, its linear
schedule without warmup, its LoRA targets) with h1tune's guarantees on top."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from h1tune.cli import main

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT.parent / "shared" / "data" / "oumi-recipes-falcon-h1"
FIXTURES = ROOT / "tests" / "fixtures" / "data"
pytestmark = pytest.mark.skipif(not RECIPES.is_dir(), reason=f"OUMI recipes not found at {RECIPES}")


def run(recipe: str, data: Path, out: Path, *extra: str) -> int:
    return main(["train", str(RECIPES / recipe), "--set", "model.name_or_path=tiny", "--set", f"data.train={data}",
                 "--set", "training.max_steps=2", "--set", "training.logging_steps=1", "--set", f"output_dir={out}",
                 *extra])


def step_logs(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_sft_recipe_runs_oumis_job_offline(tmp_path, capsys):
    out = tmp_path / "sft"
    assert run("sft/falcon_h1_0_5b/full_train.yaml", FIXTURES / "messages.jsonl", out) == 0
    printed = capsys.readouterr().out
    assert printed.index("OUMI training config") < printed.index("adapter probe"), "the report comes first"
    assert "enable_liger_kernel = true: not used" in printed and "done: 2 steps" in printed
    logs = step_logs(out)
    # the recipe's 3.2e-5, on OUMI's linear schedule without warmup (h1tune's own full-FT recipe warms up)
    assert [r["learning_rate"] for r in logs] == pytest.approx([32e-6, 16e-6])
    saved = yaml.safe_load((out / "final" / "config.yaml").read_text())
    assert (saved["adapter"]["method"], saved["training"]["objective"], saved["model"]["dtype"]) == (
        "full", "sft", "bfloat16")
    assert saved["data"]["assistant_only_loss"] is False and (out / "final" / "model.safetensors").is_file()


def test_qlora_dpo_recipe_runs_offline_with_both_modules_kept_whole(tmp_path, capsys):
    out = tmp_path / "dpo"
    assert run("dpo/falcon_h1_0_5b/qlora_dpo.yaml", FIXTURES / "preference_trl.jsonl", out) == 0
    printed = capsys.readouterr().out
    assert "changed by h1tune's guarantees" in printed and "would quantize lm_head" in printed
    logs = step_logs(out)
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-3), "DPO starts at ln 2 (policy == reference)"
    assert [r["learning_rate"] for r in logs] == pytest.approx([5e-05, 2.5e-05]), "OUMI's default LR, linear"
    saved = yaml.safe_load((out / "final" / "config.yaml").read_text())
    assert saved["training"]["objective"] == "dpo" and saved["model"]["quantization"] == "4bit"
    assert (saved["training"]["beta"], saved["training"]["loss_type"]) == (0.1, ["sigmoid"])
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    recipe = yaml.safe_load((RECIPES / "dpo/falcon_h1_0_5b/qlora_dpo.yaml").read_text())
    assert sorted(adapter["target_modules"]) == sorted(recipe["peft"]["lora_target_modules"])
    assert (adapter["r"], adapter["lora_alpha"]) == (16, 32)
    weights = load_file(out / "final" / "adapter_model.safetensors")
    assert weights and not any(".mamba." in k for k in weights), "the recipe's targets leave the Mamba mixer alone"


def test_hub_dataset_ids_fail_offline_with_the_usual_data_error(capsys):
    assert main(["check", str(RECIPES / "sft/falcon_h1_0_5b/full_train.yaml"), "--set", "model.name_or_path=tiny"]) == 2
    captured = capsys.readouterr()
    assert "--set data.train=FILE" in captured.out, "the report says how to point the dataset at a file"
    assert "'yahma/alpaca-cleaned' is not a local file" in captured.err and "point to a local file" in captured.err
