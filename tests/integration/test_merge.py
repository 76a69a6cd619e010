"""Merging a LoRA adapter into a tiny Falcon-H1: equivalence, plain-transformers loading, refusals,
QLoRA both ways, and output-directory safety (including a crash mid-write)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from h1tune.export import merge as merge_module  # noqa: E402
from h1tune.errors import H1tuneError  # noqa: E402
from h1tune.export.merge import merge_adapter  # noqa: E402

IDS = [[1, 3, 17, 99, 250, 7, 512, 42, 4]]
GREEDY = 2  # decode steps per prompt: enough to exercise generate, cheap on 2 shared cores


def make_adapter(base_dir: Path, out: Path, seed: int = 1) -> Path:
    """A peft LoRA on the safe targets with random non-zero lora_B, as if trained."""
    from h1tune.presets import save_fake_adapter

    return save_fake_adapter(base_dir, out, seed=seed)


def add_bypassed_weights(adapter: Path, out: Path) -> Path:
    """A foreign adapter: LoRA factors on mamba.conv1d and mamba.out_proj, written past peft's guard."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, out)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    for layer in range(2):
        prefix = f"base_model.model.model.layers.{layer}.mamba"
        tensors[f"{prefix}.out_proj.lora_A.weight"] = torch.randn(8, 256) * 0.05
        tensors[f"{prefix}.out_proj.lora_B.weight"] = torch.randn(256, 8) * 0.05
        tensors[f"{prefix}.conv1d.lora_A.weight"] = torch.randn(384, 1, 4) * 0.05
        tensors[f"{prefix}.conv1d.lora_B.weight"] = torch.randn(384, 384, 1) * 0.05
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "adapter_config.json").read_text())
    config["target_modules"] = sorted(config["target_modules"]) + ["conv1d", "out_proj"]
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def peft_logits(base_dir: Path, adapter: Path | None) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    from h1tune.presets import init_model

    root = tmp_path_factory.mktemp("merge")
    init_model(root / "base", "tiny", seed=0)
    make_adapter(root / "base", root / "adapter")
    return root


@pytest.fixture(scope="module")
def merged(work):
    report = merge_adapter(None, str(work / "adapter"), str(work / "merged"), greedy_tokens=GREEDY)
    return report, work / "merged"


def test_adapter_changes_logits_then_merged_matches_it(work, merged):
    report, _ = merged
    base, adapted = peft_logits(work / "base", None), peft_logits(work / "base", work / "adapter")
    assert (adapted - base).abs().max() > 0.1 * base.abs().max()  # the adapter matters
    assert report.adapter_effect.relative > 0.1
    assert report.passed and report.verification.relative < 1e-4
    assert report.verification.greedy_same == report.verification.prompts
    assert report.verification.prompts >= 3 and report.dtype == "float32"
    text = report.format()
    assert "PASS" in text and "max |Δlogit|" in text and "greedy decodes identical" in text


def test_merged_directory_is_a_stock_falcon_h1(work, merged):
    _, out = merged
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "assert type(m).__name__ == 'FalconH1ForCausalLM'\n"
        "assert AutoTokenizer.from_pretrained(sys.argv[1]).chat_template\n"
        f"ids = torch.tensor({IDS})\n"
        "with torch.no_grad():\n"
        "    torch.save(m(input_ids=ids).logits, sys.argv[2])\n"
        "assert not [k for k in sys.modules if k.startswith(('h1tune', 'peft'))]\n"
    )
    saved = work / "plain_logits.pt"
    subprocess.run([sys.executable, "-c", code, str(out), str(saved)], check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, cwd=work)
    plain = torch.load(saved)
    expected = peft_logits(work / "base", work / "adapter")
    assert (plain - expected).abs().max() <= 1e-4 * expected.abs().max()

    config, base_config = (json.loads((d / "config.json").read_text()) for d in (out, work / "base"))
    assert "quantization_config" not in config
    for key in ("embedding_multiplier", "lm_head_multiplier", "key_multiplier", "ssm_in_multiplier",
                "ssm_out_multiplier", "mlp_multipliers", "ssm_multipliers", "attention_in_multiplier"):
        assert config[key] == base_config[key], key
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    assert json.loads((out / merge_module.REPORT_FILE).read_text())["verification"]["relative"] < 1e-4
    assert not [p for p in work.iterdir() if p.name.startswith(".merged.")]  # temp dirs cleaned


def test_bypassed_targets_refused_then_dropped_on_request(work, merged):
    foreign = add_bypassed_weights(work / "adapter", work / "foreign")
    with pytest.raises(H1tuneError) as err:
        merge_adapter(str(work / "base"), str(foreign), str(work / "foreign-merged"))
    message = str(err.value)
    assert "mamba.conv1d" in message and "mamba.out_proj" in message
    assert "never trains" in message and "drop_bypassed" in message
    assert not (work / "foreign-merged").exists()

    report = merge_adapter(str(work / "base"), str(foreign), str(work / "foreign-merged"), drop_bypassed=True,
                           greedy_tokens=0)
    assert sorted(report.dropped) == ["conv1d", "out_proj"] and len(report.dropped["conv1d"]) == 2
    assert "dropped LoRA weights on 2 mamba.conv1d" in report.format()
    assert report.passed
    # What remains is exactly the clean adapter: same merged weights.
    from safetensors.torch import load_file

    clean, dropped = (load_file(str(d / "model.safetensors")) for d in (merged[1], work / "foreign-merged"))
    assert clean.keys() == dropped.keys()
    assert all(torch.equal(clean[k], dropped[k]) for k in clean)


def test_qlora_dequantized_and_original_merges_report_drift(work):
    from h1tune.config import H1tuneConfig, ModelConfig, save_config

    run = work / "qlora-run"
    shutil.copytree(work / "adapter", run / "adapter")
    save_config(H1tuneConfig(model=ModelConfig(name_or_path=str(work / "base"), quantization="4bit",
                                               dtype="float32")), run / "config.yaml")

    deq = merge_adapter(None, str(run / "adapter"), str(work / "q-deq"), greedy_tokens=GREEDY)
    assert deq.quantized_base == "4bit" and deq.merge_into == "dequantized"  # read from config.yaml
    assert "QLoRA" in deq.reference and deq.verification.relative < 1e-4
    assert deq.drift is not None  # what the other choice would have cost

    # The explicit flag, for an adapter without h1tune's config.yaml beside it.
    orig = merge_adapter(None, str(work / "adapter"), str(work / "q-orig"), quantized_base="4bit",
                         merge_into="original", greedy_tokens=0)
    assert orig.quantized_base == "4bit" and orig.merge_into == "original"
    assert orig.passed and orig.drift is not None and "drift" in orig.format()
    # Merging into the 16-bit originals moves the model away from what was trained, measurably.
    assert orig.drift.max_abs > 100 * deq.verification.max_abs
    assert orig.drift.max_abs == pytest.approx(deq.drift.max_abs, rel=1e-3)
    # The two shipped checkpoints differ only in the quantized Linears.
    from safetensors.torch import load_file

    a, b = (load_file(str(work / d / "model.safetensors")) for d in ("q-deq", "q-orig"))
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.endswith("proj.weight") and "out_proj" not in k for k in changed)


def test_output_dir_safety_checks_run_before_any_weights_load(work, merged, monkeypatch):
    adapter = str(work / "adapter")
    for out, words in [(work / "base", "input of this merge"), (work / "adapter", "input of this merge"),
                       (work / "adapter" / "sub", "input of this merge"), (work, "contains"),
                       (merged[1], "not empty")]:
        with pytest.raises(H1tuneError, match=words):
            merge_adapter(None, adapter, str(out))
    assert (merged[1] / "config.json").is_file()  # the refusal left it alone

    class Usage:
        free = 1024

    monkeypatch.setattr(merge_module.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(H1tuneError, match="GiB free"):
        merge_adapter(None, adapter, str(work / "no-space"))
    assert not (work / "no-space").exists()


def test_crash_mid_write_leaves_nothing_that_looks_complete(work, monkeypatch):
    from transformers import PreTrainedModel

    original = PreTrainedModel.save_pretrained

    def crash_halfway(self, save_directory, *args, **kwargs):
        original(self, save_directory, *args, **kwargs)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash_halfway)
    out = work / "crashed"
    with pytest.raises(OSError, match="simulated"):
        merge_adapter(None, str(work / "adapter"), str(out), greedy_tokens=0)
    assert not out.exists()
    assert not [p for p in work.iterdir() if p.name.startswith(".crashed.")]

    # With overwrite, the previous good checkpoint survives a crash.
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(OSError, match="simulated"):
        merge_adapter(None, str(work / "adapter"), str(out), overwrite=True, greedy_tokens=0)
    assert (out / "config.json").read_text() == "{}"


def test_failed_verification_publishes_nothing(work):
    out = work / "too-strict"
    with pytest.raises(H1tuneError, match="verification failed"):
        merge_adapter(None, str(work / "adapter"), str(out), tolerance=0.0, greedy_tokens=0)
    assert not out.exists()
    assert not [p for p in work.iterdir() if p.name.startswith(".too-strict.")]


def test_bad_inputs_have_clear_errors(work, tmp_path):
    with pytest.raises(H1tuneError, match="adapter_config.json"):
        merge_adapter(None, str(work / "base"), str(tmp_path / "x"))
    with pytest.raises(H1tuneError, match="dtype"):
        merge_adapter(None, str(work / "adapter"), str(tmp_path / "x"), dtype="int8")
    with pytest.raises(H1tuneError, match="merge_into"):
        merge_adapter(None, str(work / "adapter"), str(tmp_path / "x"), merge_into="both")
    assert not (tmp_path / "x").exists()
