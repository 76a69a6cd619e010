"""Long reasoning traces on one CPU (issue 22): exact packing at 8K+ tokens per document, and a whole
`h1tune train` step on a 32K-token packed row (memory plan, probe, chunked loss)."""

from __future__ import annotations

import json
import math

import torch
import yaml

from h1tune import ssm
from h1tune.cli import main
from h1tune.data.packing import collate_packed
from h1tune.presets import build_model, long_memory


def test_packed_equals_alone_for_documents_of_8k_tokens(tmp_path):
    ssm.install()
    model = long_memory(build_model("tiny", seed=0, num_hidden_layers=1, lm_head_multiplier=1.0,
                                    ssm_out_multiplier=1.0))
    g = torch.Generator().manual_seed(0)
    docs = [{"input_ids": torch.randint(5, 1000, (n,), generator=g).tolist()} for n in (8200, 3, 8300)]
    with torch.no_grad():
        packed = model(**collate_packed(docs), use_cache=False).logits[0]
        start = 0
        for doc in docs:
            n = len(doc["input_ids"])
            alone = model(input_ids=torch.tensor([doc["input_ids"]]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[start:start + n], alone, atol=2e-5, rtol=2e-5)
            start += n
        assert start == packed.shape[0] > 16000


def trace(words: int) -> str:
    return " ".join(f"Step {i}: add {i % 7} to the total." for i in range(words // 7))


def test_a_32k_token_row_of_reasoning_traces_trains_one_step(tmp_path, tiny_dir, tiny_tokenizer, capsys):
    text = trace(790)  # ~1.8K tokens: 16 traces fill the row (one 32K trace's attention alone costs ~4x the run)
    tokens = len(tiny_tokenizer(text)["input_ids"])
    rows = [{"messages": [{"role": "user", "content": f"Problem {i}?"},
                          {"role": "assistant", "content": f"The total is {i}.", "reasoning_content": text}]}
            for i in range(16)]
    data = tmp_path / "traces.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"model": {"name_or_path": str(tiny_dir)},
              "data": {"train": str(data), "max_length": 32768, "packing": True},
              "training": {"max_steps": 1, "per_device_train_batch_size": 1, "logging_steps": 1, "save_steps": 10,
                           "report_to": ["none"]},
              "output_dir": str(tmp_path / "run")}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 0
    out = capsys.readouterr().out
    assert 28000 < 16 * tokens < 32768  # the traces fill one row of 32K tokens
    assert "gradient checkpointing" in out and "adapter probe: 32/32 LoRA modules live" in out
    assert "reasoning tokens, trained" in out
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(next(r["loss"] for r in logged if "loss" in r))
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
