"""A bf16 checkpoint trained in fp32 on CPU: the frozen base stays bf16 (half the memory), the
training is the one an fp32-loaded base gives."""

import json

import torch
from safetensors.torch import load_file

from h1tune.config import load_config
from h1tune.train.preflight import check_inputs, prepare_model
from h1tune.train.run import run_training


def bf16_checkpoint(tiny_dir, tmp_path):
    """The tiny preset saved in bf16, as every hub checkpoint is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "tiny-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(out)
    return out


def run(tmp_path, model_dir, name, *overrides):
    rows = [{"messages": [{"role": "user", "content": f"Add {i} and {i}."},
                          {"role": "assistant", "content": f"{2 * i}."}]} for i in range(12)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_config(None, [
        f"model.name_or_path={model_dir}", f"data.train={data}", "data.max_length=64", "data.packing=true",
        "training.learning_rate=1e-2", "training.per_device_train_batch_size=2", "training.max_steps=4",
        "training.logging_steps=1", "training.report_to=[none]", f"output_dir={tmp_path / name}", *overrides])


def test_a_bf16_checkpoint_trains_as_with_an_fp32_base_at_half_the_weight_memory(tmp_path, tiny_dir):
    model_dir = bf16_checkpoint(tiny_dir, tmp_path)
    kept_cfg, fp32_cfg = run(tmp_path, model_dir, "kept"), run(tmp_path, model_dir, "fp32", "model.dtype=float32")

    kept = prepare_model(kept_cfg, check_inputs(kept_cfg, show=lambda *_: None), probe=True)
    fp32 = prepare_model(fp32_cfg, check_inputs(fp32_cfg, show=lambda *_: None), probe=True)
    frozen_bytes = [sum(p.numel() * p.element_size() for p in r.model.parameters() if not p.requires_grad)
                    for r in (kept, fp32)]
    assert frozen_bytes[0] < 0.55 * frozen_bytes[1], frozen_bytes
    assert all(p.dtype == torch.float32 for p in kept.model.parameters() if p.requires_grad)
    assert kept.probe.ok and fp32.probe.ok  # every adapter moves the loss on this path
    batch = kept.batches.probe_batch()
    losses = [r.model(**batch, use_cache=False).loss for r in (kept, fp32)]
    assert losses[0].dtype == torch.float32
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-6)

    trained = [load_file(run_training(cfg).final_dir / "adapter_model.safetensors") for cfg in (kept_cfg, fp32_cfg)]
    assert trained[0].keys() == trained[1].keys()
    assert max((trained[0][k] - trained[1][k]).abs().max().item() for k in trained[0]) < 1e-5
    assert any(v.abs().max() > 1e-3 for k, v in trained[0].items() if "lora_B" in k)


def test_tied_embeddings_are_stored_once_and_both_modules_compute_in_fp32():
    from h1tune.adapters.frozen_base import store_frozen_in_bf16
    from h1tune.presets import build_model

    model = build_model("tiny", num_hidden_layers=1, tie_word_embeddings=True)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(5, 1000, (1, 16))
    with torch.no_grad():
        want = model(input_ids=ids.clone(), use_cache=False).logits
    model.requires_grad_(False)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]  # lm_head's tensor is the embedding's
    assert store_frozen_in_bf16(model) == len(linears)
    assert model.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)  # fp32 random weights rounded to bf16
