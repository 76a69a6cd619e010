"""GRPO rollouts on vLLM (issue 23): the arguments TRL receives, the prefix-cache wrapper around the `LLM`
TRL's colocate mode constructs, and the refusal where vLLM cannot run. vLLM itself needs a CUDA GPU, so the
generation is not run here (said in the README)."""

from __future__ import annotations

import pytest
from trl.generation import vllm_generation

from h1tune.config import ConfigError, load_config
from h1tune.errors import H1tuneError
from h1tune.train import vllm_rollouts
from h1tune.train.arguments import trainer_kwargs
from h1tune.train.grpo import grpo_arguments


def grpo_cfg(tmp_path, **training):
    (tmp_path / "g.yaml").write_text(
        "data: {train: p.jsonl, max_length: 512}\n"
        "training: {objective: grpo, rewards: [{name: math_answer}], per_device_train_batch_size: 8, report_to: [none]}\n")
    return load_config(tmp_path / "g.yaml", [f"training.{k}={v}" for k, v in training.items()])


def test_rollouts_vllm_puts_trl_in_colocate_mode_with_the_configured_memory_share(tmp_path):
    cfg = grpo_cfg(tmp_path, rollouts="vllm", vllm_gpu_memory_utilization=0.4)
    kwargs, opt = trainer_kwargs(cfg, 1000, has_eval=False)
    args = grpo_arguments(cfg, kwargs, opt)
    assert (args.use_vllm, args.vllm_mode, args.vllm_gpu_memory_utilization) == (True, "colocate", 0.4)
    assert args.vllm_max_model_length == 512 and args.vllm_enable_sleep_mode is False
    plain = grpo_cfg(tmp_path)
    assert grpo_arguments(plain, *trainer_kwargs(plain, 1000, has_eval=False)).use_vllm is False


def test_the_llm_trl_constructs_has_prefix_caching_off(monkeypatch):
    made = []

    class FakeLLM:
        def __init__(self, *args, **kwargs):
            made.append(kwargs)

    monkeypatch.setattr(vllm_generation, "LLM", FakeLLM, raising=False)  # TRL binds it only when vLLM imports
    vllm_rollouts.without_prefix_caching()
    vllm_rollouts.without_prefix_caching()  # idempotent: one wrapper, not two
    vllm_generation.LLM(model="m", gpu_memory_utilization=0.3, enable_prefix_caching=True)
    assert made == [{"model": "m", "gpu_memory_utilization": 0.3, "enable_prefix_caching": False}]


def test_rollouts_vllm_is_refused_here_with_the_fix(monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal is for machines without one")
    with pytest.raises(H1tuneError, match="training.rollouts: vllm needs a CUDA GPU.*rollouts: transformers"):
        vllm_rollouts.require_vllm()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(vllm_rollouts.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(H1tuneError, match=r"pip install -e '\.\[vllm\]'"):
        vllm_rollouts.require_vllm()


def test_rollouts_belong_to_grpo(tmp_path):
    (tmp_path / "s.yaml").write_text("data: {train: p.jsonl}\ntraining: {rollouts: vllm}\n")
    with pytest.raises(ConfigError, match="training.rollouts: applies to objective grpo"):
        load_config(tmp_path / "s.yaml")
