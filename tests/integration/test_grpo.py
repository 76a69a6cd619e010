"""GRPO (issue 23) on the tiny preset: it learns a reward it can learn, rollout log-probs equal the
training forward's, packed forwards equal padded ones (loss terms and gradients), a resumed run
equals an uninterrupted one, and bad rewards or data are refused before anything trains."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from h1tune.cli import main

PROMPTS = [{"prompt": f"Say something about {i}."} for i in range(32)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def grpo_config(tmp_path: Path, tiny_dir, **training) -> str:
    tree = {"model": {"name_or_path": str(tiny_dir)},
            "data": {"train": str(write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)), "max_length": 96},
            "adapter": {"probe": False},
            "training": {"objective": "grpo", "rewards": [{"name": "length", "target": 200}], "num_generations": 4,
                         "max_completion_length": 24, "per_device_train_batch_size": 8, "learning_rate": 5e-3,
                         "max_steps": 10, "logging_steps": 1, "save_steps": 100, "report_to": ["none"], "seed": 0,
                         **training},
            "output_dir": str(tmp_path / "run")}
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(tree))
    return str(tmp_path / "grpo.yaml")


def metrics(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "reward" in r]


def test_grpo_learns_a_length_reward_with_rollout_logps_equal_to_training(tmp_path, tiny_dir, capsys):
    assert main(["train", grpo_config(tmp_path, tiny_dir)]) == 0
    steps = metrics(tmp_path / "run")
    rewards = [r["reward"] for r in steps]
    assert len(rewards) == 10
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.04, rewards  # seeded: 0.41 -> 0.49 when written
    assert max(r["sampling/logp_parity/max"] for r in steps) < 1e-4  # fp32 on CPU: the same model both ways
    assert {"rewards/length/mean", "completions/mean_length", "clip_ratio/region_mean"} <= set(steps[0])
    assert (tmp_path / "run" / "rewards_curve.png").is_file() and (tmp_path / "run" / "final").is_dir()
    assert "grpo: 4 completions per prompt" in capsys.readouterr().err


def test_a_resumed_grpo_run_equals_the_uninterrupted_one(tmp_path, tiny_dir, stop_after_save, monkeypatch):
    from h1tune.config import load_config
    from h1tune.train import run_training

    whole = tmp_path / "whole"
    whole.mkdir()
    assert main(["train", grpo_config(whole, tiny_dir, max_steps=4, save_steps=2)]) == 0
    parts = tmp_path / "parts"
    parts.mkdir()
    cfg = load_config(grpo_config(parts, tiny_dir, max_steps=4, save_steps=2))
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, callbacks=[stop_after_save(2)])
    assert run_training(cfg).resumed_from_step == 2
    a = load_file(whole / "run" / "final" / "adapter_model.safetensors")
    b = load_file(parts / "run" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["reward"] for r in metrics(whole / "run")] == [r["reward"] for r in metrics(parts / "run")]


def test_bad_rewards_and_mismatched_data_are_refused_before_training(tmp_path, tiny_dir, capsys):
    (tmp_path / "shape.py").write_text("def score(prompts, completions, **kw):\n    return 0.5\n")
    config = grpo_config(tmp_path, tiny_dir, rewards=[{"function": str(tmp_path / "shape.py") + ":score"}])
    assert main(["train", config]) == 2
    assert "'score' must return a list of 2 floats" in capsys.readouterr().err
    assert main(["train", config, "--set", "training.rewards=[{name: math_answer}]"]) == 2
    assert "math_answer' failed on the first prompts: ValueError: math_answer needs an `answer` column" in \
        capsys.readouterr().err
    sft_rows = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                                  {"role": "assistant", "content": "Hello"}]}])
    assert main(["train", config, "--set", f"data.train={sft_rows}"]) == 2
    assert "training.objective grpo needs prompts" in capsys.readouterr().err
    prompts = str(tmp_path / "prompts.jsonl")
    assert main(["train", config, "--set", "training.objective=sft", "--set", "training.rewards=[]",
                 "--set", f"data.train={prompts}"]) == 2
    assert "Set training.objective: grpo" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_packed_policy_forwards_equal_padded_ones_with_every_gradient(tmp_path, tiny_dir):
    """TRL's padded layout (left-padded prompts, right-padded completions) vs the same sequences packed."""
    from datasets import Dataset
    from trl import GRPOConfig

    from h1tune import ssm
    from h1tune.adapters import apply_adapter
    from h1tune.config import load_config
    from h1tune.model import load_model, load_tokenizer
    from h1tune.train.grpo import H1GRPOTrainer

    ssm.install()
    cfg = load_config(grpo_config(tmp_path, tiny_dir))
    model = apply_adapter(load_model(cfg.model), cfg)
    gen = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.05  # a trained-looking adapter
    args = GRPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=8, report_to=[], bf16=False)  # TRL defaults to bf16 autocast
    trainer = H1GRPOTrainer(model=model, reward_funcs=[lambda prompts, completions, **_: [0.0] * len(completions)],
                            args=args, train_dataset=Dataset.from_list(PROMPTS[:4]),
                            processing_class=load_tokenizer(cfg.model), packing=True)
    prompt_lengths, completion_lengths = [5, 9, 3, 7], [8, 2, 6, 1]
    ids = torch.zeros((4, 17), dtype=torch.long)
    mask = torch.zeros((4, 17), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_lengths, completion_lengths)):
        ids[i, 9 - p:9 + c] = torch.randint(5, 1000, (p + c,), generator=gen)
        mask[i, 9 - p:9 + c] = 1
    completion_mask = mask[:, 9:]
    weights = torch.randn(completion_mask.shape, generator=gen)

    def logps_and_grads(packing: bool):
        trainer.packing = packing
        model.zero_grad(set_to_none=True)
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, 8)
        (logps * weights * completion_mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return logps.detach() * completion_mask, grads

    packed, packed_grads = logps_and_grads(True)
    padded, padded_grads = logps_and_grads(False)
    torch.testing.assert_close(packed, padded, atol=2e-5, rtol=1e-5)
    assert packed_grads.keys() == padded_grads.keys() and len(packed_grads) == 64
    for name in packed_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_check_validates_a_grpo_config_and_shows_its_prompts(tmp_path, tiny_dir, capsys):
    config = grpo_config(tmp_path, tiny_dir, rewards=[{"name": "length"}, {"name": "think_format", "weight": 0.2}])
    assert main(["check", config, "--set", "adapter.probe=true", "--show-example", "1"]) == 0
    out = capsys.readouterr().out
    assert "prompt data (objective grpo)" in out and "prompts kept 32" in out
    assert "<|im_start|>user\nSay something about 0.<|im_end|>\n<|im_start|>assistant\n" in out
    assert "adapter probe: 32/32 LoRA modules live" in out and "check passed" in out
    assert not (tmp_path / "run").exists()


GROUP_LOG = '''
import json, os

def score(prompts, completions, trainer_state=None, **kw):
    step = getattr(trainer_state, "global_step", None)  # None: h1tune's check before training
    with open(os.environ["H1TUNE_GROUPS_LOG"], "a") as f:
        f.write(json.dumps({"rank": int(os.environ.get("RANK", 0)), "step": step, "prompts": prompts}) + "\\n")
    return [len(str(c)) / 100 for c in completions]
'''


def test_two_processes_generate_each_prompt_group_once_per_step(tmp_path, tiny_dir):
    """`--nproc 2` (gloo, CPU): every step's prompts are split between the ranks, each prompt generated
    num_generations times in all: no group generated on both ranks, none split short."""
    import os
    import subprocess
    import sys
    from collections import Counter

    (tmp_path / "groups.py").write_text(GROUP_LOG)
    config = grpo_config(tmp_path, tiny_dir, rewards=[{"function": str(tmp_path / "groups.py") + ":score"}],
                         per_device_train_batch_size=4, max_steps=2)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", H1TUNE_GROUPS_LOG=str(tmp_path / "groups.jsonl"))
    done = subprocess.run([sys.executable, "-m", "h1tune.cli", "train", config, "--nproc", "2"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-5000:]
    calls = [c for c in map(json.loads, (tmp_path / "groups.jsonl").read_text().splitlines()) if c["step"] is not None]
    assert sorted({(c["rank"], c["step"]) for c in calls}) == [(r, s) for r in (0, 1) for s in range(2)]
    for step in range(2):
        per_rank = {c["rank"]: c["prompts"] for c in calls if c["step"] == step}
        counts = Counter(json.dumps(p) for prompts in per_rank.values() for p in prompts)  # messages: lists
        assert len(per_rank[0]) == len(per_rank[1]) == 4
        assert len(counts) == 2 and set(counts.values()) == {4}, counts  # 8 completions: 2 groups of 4
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


def test_the_h1r_path_sft_on_traces_merge_then_grpo(tmp_path, capsys):
    """examples/h1r_sft.yaml -> h1tune merge -> examples/h1r_grpo.yaml, shortened: the README's H1R path runs
    end to end offline, the SFT trains on the traces and the RL stage starts from the merged model."""
    repo = Path(__file__).resolve().parents[2]
    sft, merged, grpo = tmp_path / "sft", tmp_path / "merged", tmp_path / "grpo"
    assert main(["train", str(repo / "examples" / "h1r_sft.yaml"), "--set", f"output_dir={sft}",
                 "--set", "training.num_train_epochs=1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"reasoning tokens, trained +3,691", out), out[-3000:]  # 48 traces, every trace token trained
    assert main(["merge", str(sft / "final"), str(merged)]) == 0
    assert main(["train", str(repo / "examples" / "h1r_grpo.yaml"), "--set", f"model.name_or_path={merged}",
                 "--set", f"output_dir={grpo}", "--set", "training.max_steps=2"]) == 0
    assert "clip 0.2 to 0.28" in capsys.readouterr().err
    steps = metrics(grpo)
    assert len(steps) == 2 and "rewards/math_answer/mean" in steps[0]
    assert yaml.safe_load((grpo / "config.yaml").read_text())["training"]["recipe"] == "h1r_grpo"
    assert (grpo / "final" / "adapter_model.safetensors").is_file()
