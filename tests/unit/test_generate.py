"""Generation on a tiny Falcon-H1: streaming, end-of-turn stop, scripted multi-turn chat, 4-bit base + adapter."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from h1tune.config import ModelConfig  # noqa: E402
from h1tune.errors import H1tuneError  # noqa: E402
from h1tune.generate import (  # noqa: E402
    SamplingConfig, chat_loop, generate_reply, load_for_generation, stop_ids,
)

SHORT = SamplingConfig(max_new_tokens=3)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    from h1tune.presets import init_model

    return init_model(tmp_path_factory.mktemp("gen") / "base", "tiny", seed=0)


@pytest.fixture(scope="module")
def loaded(base_dir):
    return load_for_generation(ModelConfig(name_or_path=str(base_dir), dtype="float32"))


@pytest.fixture(scope="module")
def adapter_dir(base_dir) -> Path:
    from h1tune.presets import save_fake_adapter

    return save_fake_adapter(base_dir, base_dir.parent / "adapter", r=4, targets=["q_proj", "in_proj", "down_proj"])


def scripted(lines: list[str]):
    """An input_fn that replays `lines`, then signals end of input like Ctrl-D."""
    it = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


def test_streamed_text_is_the_reply(loaded):
    model, tokenizer = loaded
    out = io.StringIO()
    reply = generate_reply(model, tokenizer, [{"role": "user", "content": "Hello"}], SHORT, output=out)
    assert out.getvalue().strip() == reply.strip()


def test_stops_at_the_end_of_turn_token(base_dir):
    model, tokenizer = load_for_generation(ModelConfig(name_or_path=str(base_dir), dtype="float32"))
    messages = [{"role": "user", "content": "Hello"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        first = int(model(input_ids=ids).logits[0, -1].argmax())
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert im_end in stop_ids(tokenizer)
        # Make <|im_end|> the greedy choice at the first step: its logit becomes 10x the winner's.
        model.lm_head.weight[im_end] = model.lm_head.weight[first] * 10
    long = SamplingConfig(max_new_tokens=20)
    assert generate_reply(model, tokenizer, messages, long, stream=False) == ""


def test_chat_loop_multi_turn_reset_and_exit(loaded):
    model, tokenizer = loaded
    out = io.StringIO()
    history = chat_loop(model, tokenizer, SHORT, input_fn=scripted(["Hi", "", "/help", "And again?"]), output=out,
                        system="Be brief.")
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user", "assistant"]
    assert history[3]["content"] == "And again?"

    history = chat_loop(model, tokenizer, SHORT, input_fn=scripted(["Hi", "/reset", "Fresh start", "/exit", "ignored"]),
                        output=out)
    assert [m["content"] for m in history if m["role"] == "user"] == ["Fresh start"]
    text = out.getvalue()
    assert "(conversation reset)" in text and "/reset" in text and "assistant: " in text


def test_chat_loop_unknown_command_is_not_sent(loaded):
    model, tokenizer = loaded
    out = io.StringIO()
    assert chat_loop(model, tokenizer, SHORT, input_fn=scripted(["/bogus"]), output=out) == []
    assert "unknown command '/bogus'" in out.getvalue()


def test_sampling_is_seeded_and_validated(loaded):
    model, tokenizer = loaded
    hot = SamplingConfig(max_new_tokens=4, temperature=1.0, top_p=0.9, top_k=50, seed=3)
    messages = [{"role": "user", "content": "Tell me something."}]
    assert generate_reply(model, tokenizer, messages, hot, stream=False) == \
        generate_reply(model, tokenizer, messages, hot, stream=False)
    with pytest.raises(H1tuneError, match="temperature"):
        SamplingConfig(temperature=-1)
    with pytest.raises(H1tuneError, match="top_p"):
        SamplingConfig(top_p=0)


def test_adapter_dir_stands_for_its_base_plus_adapter(base_dir, adapter_dir):
    model, _ = load_for_generation(ModelConfig(name_or_path=str(adapter_dir), dtype="float32"))
    assert type(model).__name__ == "PeftModel"


def test_qlora_adapter_runs_on_the_4bit_base_its_run_trained_on(base_dir, adapter_dir, tmp_path):
    """A QLoRA run's config.yaml beside the adapter is enough: no --quantization needed."""
    import shutil

    import bitsandbytes as bnb
    import yaml

    qlora_dir = tmp_path / "final"
    shutil.copytree(adapter_dir, qlora_dir)
    (qlora_dir / "config.yaml").write_text(yaml.safe_dump({"model": {"quantization": "4bit"}}))
    model, _ = load_for_generation(ModelConfig(name_or_path=str(qlora_dir), dtype="float32"))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    plain, _ = load_for_generation(ModelConfig(name_or_path=str(adapter_dir), dtype="float32"))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in plain.modules())


def test_4bit_base_plus_adapter_quantized_as_in_training(base_dir, adapter_dir):
    import bitsandbytes as bnb

    model, tokenizer = load_for_generation(ModelConfig(name_or_path=str(base_dir), dtype="float32"),
                                           str(adapter_dir), quantization="4bit")
    modules = dict(model.named_modules())
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in modules.values()) == 32
    for name, module in modules.items():
        if name.endswith(("mamba.out_proj", "lm_head")):
            assert type(module) is torch.nn.Linear, name  # kept whole, as in training
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=prompt).logits
    assert torch.isfinite(logits).all() and logits.abs().max() > 0
    reply = generate_reply(model, tokenizer, [{"role": "user", "content": "Hi"}], SHORT, stream=False)
    with torch.no_grad():  # the reply is the greedy continuation of the 4-bit model, decoded
        direct = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                max_new_tokens=SHORT.max_new_tokens, eos_token_id=stop_ids(tokenizer),
                                pad_token_id=tokenizer.pad_token_id)
    assert reply == tokenizer.decode(direct[0, prompt.shape[1]:], skip_special_tokens=True)


def test_refuses_adapter_with_bypassed_weights(base_dir, adapter_dir):
    from safetensors.torch import load_file, save_file

    foreign = adapter_dir.parent / "foreign"
    shutil.copytree(adapter_dir, foreign)
    tensors = load_file(str(foreign / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.mamba.out_proj.lora_A.weight"] = torch.zeros(4, 256)
    save_file(tensors, str(foreign / "adapter_model.safetensors"))
    with pytest.raises(H1tuneError, match="mamba.out_proj"):
        load_for_generation(ModelConfig(name_or_path=str(base_dir), dtype="float32"), str(foreign))
