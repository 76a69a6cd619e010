"""Shared fixtures: tiny Falcon-H1 checkpoints built in-process, offline, fp32."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Exactness tests compare in fp32; `dtype: auto` would train in bf16 on CPUs with native bf16
# (h1tune.precision). Tests of that decision set the flag themselves.
os.environ.setdefault("H1TUNE_CPU_BF16", "0")


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on shared 2-core machines OpenMP threads of
    concurrent processes stall each other (a tiny forward measured 2.2 s with 2 threads, 0.06 s with 1)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Falcon-H1 checkpoint + tokenizer on disk (built once per test session)."""
    from h1tune.presets import init_model

    return init_model(tmp_path_factory.mktemp("models") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from h1tune.presets import build_tokenizer

    return build_tokenizer()


@pytest.fixture
def stop_after_save():
    """A callback class that interrupts a run (like Ctrl-C) right after the checkpoint of `step`."""
    from transformers import TrainerCallback

    class StopAfter(TrainerCallback):
        def __init__(self, step):
            self.step = step

        def on_save(self, args, state, control, **kwargs):
            if state.global_step == self.step:
                raise KeyboardInterrupt

    return StopAfter
