"""Adapter policy: target spellings refused with reasons, resolution against real module names, tables."""

from __future__ import annotations

import pytest
import torch

from h1tune.adapters import apply_adapter, summarize_trainable
from h1tune.adapters.lora import lora_config, resolve_targets
from h1tune.config import AdapterConfig, H1tuneConfig, ModelConfig, config_from_dict
from h1tune.errors import ConfigError, H1tuneError
from h1tune.model import checkpoint_quantization_problems, quantization_config, skip_modules
from h1tune.policy import ALWAYS_UNQUANTIZED, TARGET_GROUPS, target_spelling_problems
from h1tune.presets import build_model

SAFE_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "gate_proj", "up_proj", "down_proj"}
LAYERS = 2


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", num_hidden_layers=LAYERS)


def _config_problems(**adapter) -> list[str]:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"adapter": adapter})
    return err.value.problems


@pytest.mark.parametrize("spec,leaf", [
    ("conv1d", "conv1d"),
    ("out_proj", "out_proj"),
    ("mamba.out_proj", "out_proj"),
    ("mamba.conv1d", "conv1d"),
    ("model.layers.0.mamba.conv1d", "conv1d"),
    ("model.layers.0.mamba.out_proj", "out_proj"),
    (".*out_proj", "out_proj"),
    (r".*\.mamba\..*", "out_proj"),
    (r".*\.mamba\..*", "conv1d"),
    (".*", "out_proj"),
    (r"model\.layers\.7\.mamba\.(in|out)_proj", "out_proj"),
    (r"(?i).*OUT_PROJ", "out_proj"),
    (r".*(conv1d|q_proj)", "conv1d"),
])
def test_bypassed_spellings_are_refused_at_config_validation(spec, leaf):
    problems = _config_problems(target_modules=["attention", spec])
    hit = [p for p in problems if f"reaches mamba.{leaf}" in p]
    assert hit, problems
    assert hit[0].startswith(f"adapter.target_modules: {spec!r}")
    assert "fused Mamba kernel reads" in hit[0] and "remove it (default targets" in hit[0]
    if leaf == "conv1d":
        assert "depthwise" in hit[0] and "merge" in hit[0]


@pytest.mark.parametrize("spec", ["all", "ALL", "all_linear", "All-Linear", "*", "linear"])
def test_all_lookalikes_point_to_all_linear(spec):
    problems = _config_problems(target_modules=[spec])
    assert any("use 'all-linear'" in p and "never mamba.out_proj" in p for p in problems), problems


@pytest.mark.parametrize("spec,needle", [
    ("lm_head", "lm_head"),
    ("q_porj", "matches no Falcon-H1 module"),
    ("(unclosed", "not a valid regex"),
    ("self_attn", "not a Linear layer"),
    ("mamba.in_proj.weight", "names a parameter"),
])
def test_other_bad_spellings_are_refused(spec, needle):
    assert any(needle in p for p in _config_problems(target_modules=[spec]))


def test_empty_target_list_is_refused():
    assert any("is empty" in p for p in _config_problems(target_modules=[]))


def test_good_spellings_pass():
    for specs in (["attention", "mamba", "mlp"], ["all-linear"], ["q_proj", "in_proj", "mamba.in_proj"],
                  [r".*\.(q|v)_proj"], ["model.layers.3.self_attn.q_proj"]):
        assert target_spelling_problems(specs) == [], specs
    config_from_dict({"adapter": {"target_modules": "all-linear"}})


def test_exclude_can_make_a_broad_regex_safe():
    broad = [r".*\.mamba\..*_proj"]
    assert target_spelling_problems(broad)
    assert target_spelling_problems(broad, exclude=["out_proj"]) == []


def test_all_linear_resolves_to_the_safe_set(model):
    names = resolve_targets(model, AdapterConfig(target_modules=["all-linear"]))
    assert len(names) == 8 * LAYERS
    assert {n.rsplit(".", 1)[-1] for n in names} == SAFE_LEAVES
    assert not any(n.endswith(("out_proj", "conv1d", "lm_head")) for n in names)
    assert names == resolve_targets(model, AdapterConfig())  # the default groups are the same set


def test_groups_and_exclude(model):
    names = resolve_targets(model, AdapterConfig(target_modules=["attention", "mlp"], exclude_modules=["o_proj"]))
    assert len(names) == 6 * LAYERS and not any("o_proj" in n or "mamba" in n for n in names)
    names = resolve_targets(model, AdapterConfig(target_modules=["mamba"], exclude_modules=[r".*layers\.0\..*"]))
    assert names == [f"model.layers.{i}.mamba.in_proj" for i in range(1, LAYERS)]


def test_resolution_refuses_bypassed_modules_of_the_real_model(model):
    with pytest.raises(ConfigError) as err:
        resolve_targets(model, AdapterConfig.model_construct(
            **{**AdapterConfig().model_dump(), "target_modules": ["model.layers.1.mamba.out_proj"]}))
    assert "reaches mamba.out_proj" in str(err.value)


def test_zero_matches_is_an_error(model):
    with pytest.raises(ConfigError, match="matches no module of this model"):
        resolve_targets(model, AdapterConfig(target_modules=["model.layers.9.self_attn.q_proj"]))
    with pytest.raises(ConfigError, match=r"'mamba' matches no module"):
        resolve_targets(model, AdapterConfig(target_modules=["attention", "mamba"], exclude_modules=["in_proj"]))


def test_lora_config_is_explicit(model):
    names = resolve_targets(model, AdapterConfig())
    cfg = lora_config(AdapterConfig(r=4), names)
    assert sorted(cfg.target_modules) == sorted(names) and cfg.r == 4


def test_apply_lora_wraps_exactly_the_resolved_modules():
    peft_model = apply_adapter(build_model("tiny", num_hidden_layers=LAYERS), H1tuneConfig())
    wrapped = {n.removeprefix("base_model.model.").split(".lora_A")[0]
               for n, _ in peft_model.named_parameters() if ".lora_A" in n}
    assert len(wrapped) == 8 * LAYERS
    assert all(p.requires_grad == (".lora_" in n) for n, p in peft_model.named_parameters())
    rows = {line.split()[0]: line.split()[1:] for line in summarize_trainable(peft_model).splitlines()[1:]}
    # modules wrapped per group: q/k/v/o, in_proj only, gate/up/down
    assert {g: rows[g][0] for g in TARGET_GROUPS} == {"attention": str(4 * LAYERS), "mamba": str(LAYERS),
                                                      "mlp": str(3 * LAYERS)}
    assert rows["embeddings"][0] == "-" and rows["embeddings"][1] == "0"  # frozen, nothing wrapped
    lora_params = sum(p.numel() for n, p in peft_model.named_parameters() if ".lora_" in n)
    assert rows["total"][1] == f"{lora_params:,}"


def test_param_group_labels_modules_parameters_and_lora_factors():
    from h1tune.policy import param_group

    expected = {
        "model.embed_tokens": "embeddings", "model.embed_tokens.weight": "embeddings", "lm_head.weight": "lm_head",
        "model.layers.0.mamba.norm": "norms", "model.layers.0.mamba.norm.weight": "norms",
        "model.layers.0.input_layernorm.weight": "norms", "model.final_layernorm": "norms",
        "model.layers.0.mamba.conv1d": "mamba", "model.layers.0.mamba.out_proj": "mamba",
        "model.layers.0.mamba.A_log": "mamba", "model.layers.1.mamba.in_proj": "mamba",
        "base_model.model.model.layers.1.mamba.in_proj.lora_A.default.weight": "mamba",
        "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight": "attention",
        "model.layers.0.self_attn.o_proj": "attention", "model.layers.0.feed_forward.down_proj": "mlp",
        "model.rotary_emb": "other",
    }
    assert {name: param_group(name) for name in expected} == expected


def test_full_freeze_unknown_group_and_everything():
    model = build_model("tiny", num_hidden_layers=1)
    with pytest.raises(ConfigError, match="unknown group 'bogus'"):  # refused by the config, before any model
        config_from_dict({"adapter": {"method": "full", "freeze": ["bogus"]}})
    every = ["embeddings", "lm_head", "norms", "attention", "mamba", "mlp"]
    with pytest.raises(ConfigError, match="freezes every parameter"):
        apply_adapter(model, config_from_dict({"adapter": {"method": "full", "freeze": every}}))


def test_skip_list_always_keeps_out_proj_and_lm_head():
    assert skip_modules([]) == list(ALWAYS_UNQUANTIZED)
    assert skip_modules(["model.layers.0.self_attn"]) == ["out_proj", "lm_head", "model.layers.0.self_attn"]
    # A user list that omits lm_head (or names out_proj only) still yields both.
    assert set(skip_modules(["out_proj"])) == {"out_proj", "lm_head"}
    bnb = quantization_config(ModelConfig(quantization="4bit", llm_int8_skip_modules=["gate_proj"]), torch.float32)
    assert bnb.llm_int8_skip_modules == ["out_proj", "lm_head", "gate_proj"]
    assert bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    assert bnb.bnb_4bit_compute_dtype == torch.float32
    bnb8 = quantization_config(ModelConfig(quantization="8bit", llm_int8_skip_modules=["lm_head"]), torch.float32)
    assert bnb8.load_in_8bit and bnb8.llm_int8_skip_modules == ["out_proj", "lm_head"]
    with pytest.raises(ConfigError, match="llm_int8_skip_modules"):
        skip_modules(["(bad"])


def test_prequantized_checkpoint_that_quantizes_out_proj_is_refused():
    class Cfg:
        quantization_config = {"quant_method": "bitsandbytes", "llm_int8_skip_modules": ["lm_head"]}
    problems = checkpoint_quantization_problems(Cfg())
    assert problems and "out_proj" in problems[0]
    Cfg.quantization_config = {"quant_method": "bitsandbytes", "llm_int8_skip_modules": ["out_proj", "lm_head"]}
    assert checkpoint_quantization_problems(Cfg()) == []


def test_full_method_refuses_quantized_models():
    model = build_model("tiny", num_hidden_layers=1)
    model.is_loaded_in_4bit = True
    with pytest.raises(H1tuneError, match="quantized"):
        apply_adapter(model, H1tuneConfig.model_construct(
            adapter=AdapterConfig.model_construct(**{**AdapterConfig().model_dump(), "method": "full"})))


def test_resolution_checks_real_names_even_if_the_spelling_check_missed(model, monkeypatch):
    import h1tune.adapters.lora as lora

    monkeypatch.setattr(lora, "target_spelling_problems", lambda specs, exclude=(): [])
    with pytest.raises(ConfigError) as err:
        resolve_targets(model, AdapterConfig(target_modules=["attention", r".*\.mamba\..*", "lm_head"]))
    text = str(err.value)
    assert "selects 'model.layers.0.mamba.out_proj'" in text and "selects 'model.layers.0.mamba.conv1d'" in text
    assert "depthwise" in text and "lm_head" in text
