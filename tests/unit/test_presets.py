"""Embedded Falcon-H1 presets: build, train a step, round-trip, real shapes, chat template."""

import json

import pytest
import torch

from h1tune.presets import PRESET_BUILD, build_model, build_tokenizer, init_model


def test_tiny_forward_backward_runs_and_is_deterministic():
    a, b = build_model("tiny", seed=3), build_model("tiny", seed=3)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    assert 2e6 < sum(p.numel() for p in a.parameters()) < 8e6
    a.train()
    ids = torch.randint(10, 1000, (2, 64))
    out = a(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for n, p in a.named_parameters() if "layers.0." in n and "conv1d" not in n)


def test_presets_keep_the_mup_multipliers():
    config = build_model("tiny").config
    assert config.lm_head_multiplier == 0.0390625 and config.embedding_multiplier == 5.657
    assert list(config.mlp_multipliers) == [0.884, 0.586] and config.ssm_out_multiplier == 0.2357


@pytest.mark.parametrize("preset, expected", [("0.5b", 521_411_104), ("1.5b", 1_554_789_760)])
def test_real_shape_presets_have_published_parameter_counts_without_allocating(preset, expected):
    model = build_model(preset, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == expected


def test_save_load_round_trip_gives_identical_logits(tiny_dir):
    from transformers import AutoModelForCausalLM

    built = build_model("tiny", seed=0)
    loaded = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ids = torch.randint(10, 1000, (1, 40))
    with torch.no_grad():
        assert torch.equal(built(ids).logits, loaded(ids).logits)
    assert json.loads((tiny_dir / "h1tune_preset.json").read_text()) == {"preset": "tiny", "seed": 0, "build": PRESET_BUILD}
    assert list(tiny_dir.glob("*.safetensors"))


def test_tokenizer_is_deterministic_and_has_falcon_special_tokens(tiny_tokenizer):
    again = build_tokenizer()
    assert again.get_vocab() == tiny_tokenizer.get_vocab()
    assert tiny_tokenizer.bos_token == "<|begin_of_text|>" and tiny_tokenizer.eos_token == "<|im_end|>"
    text = "Falcon-H1 runs attention and Mamba-2 side by side."
    assert tiny_tokenizer.decode(tiny_tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_chat_template_renders_chatml_with_bos_and_tools(tiny_tokenizer):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": '{"t": 21}'},
        {"role": "assistant", "content": "Sunny."},
    ]
    text = tiny_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    expected = (
        "<|begin_of_text|><|im_start|>system\nBe brief.\n\n"
        "You may call one or more functions. Function signatures are listed in <tools></tools>:\n<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}\n</tools>\n'
        'To call a function, reply with <tool_call>{"name": ..., "arguments": ...}</tool_call>.<|im_end|>\n'
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>tool\n<tool_response>\n{"t": 21}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\nSunny.<|im_end|>\n"
    )
    assert text == expected
    prompt = tiny_tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|begin_of_text|><|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"


def test_init_model_refuses_a_non_empty_directory(tmp_path):
    from h1tune.errors import H1tuneError

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(H1tuneError, match="not empty"):
        init_model(tmp_path / "x")
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_cached_preset_is_rebuilt_when_built_by_older_code(tmp_path, monkeypatch):
    from h1tune import presets as tiny

    monkeypatch.setenv("H1TUNE_CACHE", str(tmp_path))
    path = tiny.cached_preset("tiny")
    marker = path / "h1tune_preset.json"
    marker.write_text(json.dumps({"preset": "tiny", "seed": 0, "build": tiny.PRESET_BUILD - 1}))
    assert tiny.cached_preset("tiny") == path
    assert json.loads(marker.read_text())["build"] == tiny.PRESET_BUILD


# Published values we could read (family.py names each source): layers, width, heads, d_state.
PUBLISHED = {
    "tiny-90m": (24, 512, 8, 2, 24, 64), "0.5b": (36, 1024, 8, 2, 24, 128), "1.5b": (24, 2048, 8, 2, 48, 256),
    "1.5b-deep": (66, 1280, 6, 2, 24, 256), "3b": (32, 2560, 10, 2, 32, 256), "7b": (44, 3072, 12, 2, 24, 256),
    "34b": (72, 5120, 20, 4, 32, 256), "h1r-7b": (44, 3072, 12, 2, 24, 256),
}


@pytest.mark.parametrize("preset", PUBLISHED)
def test_family_presets_have_the_published_shapes_on_the_meta_device(preset):
    config = build_model(preset, device="meta").config
    shape = (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
             config.mamba_n_heads, config.mamba_d_state)
    assert shape == PUBLISHED[preset]


def test_family_parameter_counts_match_the_published_sizes():
    counts = {p: sum(t.numel() for t in build_model(p, device="meta").parameters()) for p in ("tiny-90m", "1.5b-deep", "7b")}
    assert 90e6 < counts["tiny-90m"] < 92e6  # "90M", tied embeddings
    assert 1.5e9 < counts["1.5b-deep"] < 1.6e9 and 7.5e9 < counts["7b"] < 7.7e9


def test_big_presets_are_shapes_only_and_chat_formats_follow_the_family(tmp_path):
    from h1tune.errors import H1tuneError
    from h1tune.presets import PRESET_CHAT_FORMAT
    from h1tune.templates import CHAT_FORMATS

    with pytest.raises(H1tuneError, match="shape for memory plans"):
        init_model(tmp_path / "big", preset="7b")
    assert not (tmp_path / "big").exists()
    assert PRESET_CHAT_FORMAT["h1r-7b"] == "h1r" and PRESET_CHAT_FORMAT["tiny-90m"] == "h1tiny"
    path = init_model(tmp_path / "r", preset="tiny-h1r")
    assert build_tokenizer("h1r").chat_template == CHAT_FORMATS["h1r"]
    assert "reasoning_content" in (path / "chat_template.jinja").read_text() or \
        "reasoning_content" in (path / "tokenizer_config.json").read_text()
