"""`h1tune eval` end to end on tiny models: perplexity falls after training, the run's own eval loss is
reproduced, packed == unpacked, base + adapter == merged, samples are the generator's replies, and the
lm-eval wrapper's log-likelihoods equal h1tune's own computation of the same continuations."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from h1tune.cli import main
from h1tune.config import ModelConfig, load_config
from h1tune.evaluation import EvalOptions, run_eval
from h1tune.generate import SamplingConfig

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MC_TASK = FIXTURES / "eval_tasks" / "h1tune_mc.yaml"
ROWS = [
    {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]},
    {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]},
    {"messages": [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two, three."}]},
]


@pytest.fixture(scope="module")
def memorise_file(tmp_path_factory) -> Path:
    """Three short conversations, repeated: a set the tiny model memorises in a few steps."""
    path = tmp_path_factory.mktemp("data") / "memorise.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 4))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, memorise_file, tiny_dir):
    """A short LoRA run on the set, evaluating on the same set (its eval loss is the reference)."""
    from h1tune.train import run_training

    out = tmp_path_factory.mktemp("run") / "run"
    cfg = load_config(None, [
        f"model.name_or_path={tiny_dir}", f"data.train={memorise_file}", f"data.eval={memorise_file}",
        "data.max_length=64", "adapter.lora_dropout=0.0", "adapter.probe=false", "training.learning_rate=1e-2",
        "training.per_device_train_batch_size=4", "training.max_steps=12", "training.save_steps=100",
        "training.report_to=[none]", f"output_dir={out}"])
    return run_training(cfg)


def eval_config(*overrides: str):
    return load_config(None, ["data.max_length=64", *overrides])


def test_cli_perplexity_falls_after_training_and_matches_the_runs_eval_loss(tmp_path, capsys, memorise_file,
                                                                              tiny_dir, trained):
    report = tmp_path / "eval.json"
    code = main(["eval", str(tiny_dir), str(trained.output_dir), "--data", str(memorise_file),
                 "--set", "data.max_length=64", "--batch-size", "3", "--output", str(report)])
    assert code == 0
    base, tuned = json.loads(report.read_text())["models"]
    assert tuned["path"] == str(trained.final_dir) and tuned["kind"] == "adapter"
    assert base["heldout"]["tokens"] == tuned["heldout"]["tokens"] > 0
    assert tuned["heldout"]["loss"] < base["heldout"]["loss"] - 1.0
    assert tuned["heldout"]["perplexity"] < base["heldout"]["perplexity"] / 2
    # the same token-weighted loss as the run's own evaluation on the same set
    assert tuned["heldout"]["loss"] == pytest.approx(trained.eval_metrics["eval_loss"], rel=1e-5)
    assert tuned["heldout"]["tokens"] == trained.eval_metrics["eval_tokens"]

    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if str(tiny_dir) in line)
    assert str(trained.output_dir) in header
    assert f"{tuned['heldout']['perplexity']:.2f}" in table and f"{base['heldout']['loss']:.4f}" in table


def test_packed_rows_give_the_unpacked_loss(trained, memorise_file):
    options = EvalOptions(data=[str(memorise_file)], batch_size=2)
    packed = run_eval([str(trained.output_dir)], eval_config("data.packing=true"), options, echo=lambda _: None)
    options.batch_size = 5
    padded = run_eval([str(trained.output_dir)], eval_config("data.packing=false"), options, echo=lambda _: None)
    p, u = packed.results[0].loss, padded.results[0].loss
    assert p.rows < u.rows == p.examples == 12, "packing really packed"
    assert p.tokens == u.tokens > 0
    assert p.loss == pytest.approx(u.loss, rel=1e-5)


def test_base_plus_adapter_gives_the_merged_models_loss(tmp_path, tiny_dir, memorise_file):
    from h1tune.export.merge import merge_adapter
    from h1tune.presets import save_fake_adapter

    adapter = save_fake_adapter(tiny_dir, tmp_path / "adapter")
    merge_adapter(None, str(adapter), str(tmp_path / "merged"), greedy_tokens=2)
    report = run_eval([str(tiny_dir), str(adapter), str(tmp_path / "merged")], eval_config(),
                      EvalOptions(data=[str(memorise_file)]), echo=lambda _: None)
    base, with_adapter, merged = (r.loss for r in report.results)
    assert report.results[1].spec.kind == "adapter" and report.results[2].spec.kind == "model"
    assert abs(with_adapter.loss - base.loss) > 1e-2, "the adapter changes the loss"
    assert merged.tokens == with_adapter.tokens
    assert merged.loss == pytest.approx(with_adapter.loss, rel=1e-5)


def test_samples_are_the_generators_replies_written_with_their_settings(tmp_path, capsys, tiny_dir, trained):
    from h1tune.generate import generate_reply, load_for_generation

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(ROWS[1]) + "\n" + json.dumps({"prompt": "Say hello."}) + "\n")
    options = EvalOptions(prompts=str(prompts), samples_output=str(tmp_path / "s.jsonl"),
                          sampling=SamplingConfig(max_new_tokens=5))
    report = run_eval([str(tiny_dir), str(trained.output_dir)], eval_config(), options)
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [(r["model"], r["prompt_index"]) for r in rows] == [
        (str(tiny_dir), 0), (str(tiny_dir), 1), (str(trained.output_dir), 0), (str(trained.output_dir), 1)]
    assert rows[0]["reference"] == "Paris." and rows[1]["reference"] is None
    assert rows[0]["sampling"]["temperature"] == 0.0 and rows[0]["sampling"]["max_new_tokens"] == 5
    assert report.results[0].loss is None and report.results[0].samples == 2

    model, tokenizer = load_for_generation(ModelConfig(name_or_path=str(trained.final_dir)))
    direct = generate_reply(model, tokenizer, ROWS[1]["messages"][:1], SamplingConfig(max_new_tokens=5), stream=False)
    assert rows[2]["reply"] == direct
    shown = capsys.readouterr().out
    assert "[1] Capital of France?" in shown and "reference" in shown and "Paris." in shown


def test_sampled_generations_are_reproducible_from_their_seed(tmp_path, tiny_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say hello.\nCount to three.\n")

    def replies(seed: int) -> list[str]:
        options = EvalOptions(prompts=str(prompts), samples_output=str(tmp_path / f"{seed}.jsonl"),
                              sampling=SamplingConfig(max_new_tokens=8, temperature=1.5, seed=seed))
        return [r["reply"] for r in run_eval([str(tiny_dir)], eval_config(), options, echo=lambda _: None).samples]

    first = replies(3)
    assert replies(3) == first
    assert replies(4) != first, "a different seed samples differently (8 tokens at temperature 1.5)"


def own_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """sum log p(continuation | context), computed with h1tune's own token loss (one sequence, no padding)."""
    from h1tune.lm.loss import token_loss_sum

    whole = tokenizer(context + continuation)["input_ids"]
    n_context = len(tokenizer(context)["input_ids"])
    ids = torch.tensor([whole])
    labels = ids.clone()
    labels[0, :n_context] = -100
    with torch.no_grad():
        loss, count = token_loss_sum(model, {"input_ids": ids, "labels": labels})
    assert count == len(whole) - n_context > 0
    return -loss.item()


def test_lm_eval_log_likelihoods_equal_h1tunes_own_on_a_local_task(tmp_path, monkeypatch, tiny_dir):
    pytest.importorskip("lm_eval")
    from h1tune.evaluation import HarnessOptions, load_eval_model, resolve_model, run_tasks
    from h1tune.presets import save_fake_adapter

    monkeypatch.chdir(tmp_path)  # the task's data_files are found relative to its YAML, not the cwd
    adapter = save_fake_adapter(tiny_dir, tmp_path / "adapter")  # the PeftModel path, as `h1tune eval` loads it
    model, tokenizer = load_eval_model(resolve_model(str(adapter)), ModelConfig())
    result = run_tasks(model, tokenizer, HarnessOptions(tasks=[str(MC_TASK)], batch_size=3, log_samples=True))

    docs = [json.loads(line) for line in MC_TASK.with_suffix(".jsonl").read_text().splitlines()]
    samples = result.samples["h1tune_mc"]
    assert sorted(s["doc_id"] for s in samples) == list(range(len(docs)))
    correct = 0
    for sample in samples:
        doc = docs[sample["doc_id"]]
        own = [own_loglikelihood(model, tokenizer, f"Question: {doc['question']}\nAnswer:", f" {choice}")
               for choice in doc["choices"]]
        harness = [float(resp[0]) for resp in sample["filtered_resps"]]
        assert harness == pytest.approx(own, abs=1e-4), doc["question"]
        correct += max(range(len(own)), key=own.__getitem__) == doc["answer"]
    assert result.scores["h1tune_mc"]["acc"] == pytest.approx(correct / len(docs))
    assert 0 <= result.scores["h1tune_mc"]["acc_norm"] <= 1 and "acc_stderr" in result.scores["h1tune_mc"]


def test_a_qlora_run_is_evaluated_on_the_4bit_base_it_trained_on(tmp_path, memorise_file, tiny_dir):
    from h1tune.evaluation.loss import heldout_loss, read_eval_conversations
    from h1tune.generate import load_for_generation
    from h1tune.train import run_training

    cfg = load_config(None, [
        f"model.name_or_path={tiny_dir}", "model.quantization=4bit", f"data.train={memorise_file}",
        f"data.eval={memorise_file}", "data.max_length=64", "adapter.lora_dropout=0.0", "adapter.probe=false",
        "training.learning_rate=1e-3", "training.max_steps=2", "training.report_to=[none]",
        f"output_dir={tmp_path / 'qlora'}"])
    run = run_training(cfg)
    evaluated = run_eval([str(run.output_dir)], eval_config(), EvalOptions(data=[str(memorise_file)]),
                         echo=lambda _: None).results[0].loss
    assert evaluated.loss == pytest.approx(run.eval_metrics["eval_loss"], rel=1e-5)

    model, tokenizer = load_for_generation(ModelConfig(name_or_path=str(run.final_dir)), quantization="none")
    conversations = read_eval_conversations(eval_config(f"data.eval={memorise_file}").data, seed=0)
    on_16bit = heldout_loss(model, tokenizer, conversations, eval_config().data, batch_size=8)
    assert abs(on_16bit.loss - evaluated.loss) > 1e-4, "the 4-bit base gives a different loss, so the check can fail"


def test_a_run_directory_without_config_is_scored_with_the_runs_data_settings(tmp_path, capsys, caplog, trained,
                                                                             memorise_file):
    with caplog.at_level(logging.INFO, logger="h1tune"):
        assert main(["eval", str(trained.output_dir), "--output", str(tmp_path / "own.json")]) == 0
    assert "data settings of the run" in caplog.text and "max_length 64" in caplog.text
    assert main(["eval", str(trained.output_dir), "--data", str(memorise_file), "--set", "data.max_length=64",
                 "--config", str(trained.output_dir / "config.yaml"), "--output", str(tmp_path / "explicit.json")]) == 0
    own, explicit = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("own", "explicit"))
    assert own["settings"]["data"]["max_length"] == 64
    assert own["models"][0]["heldout"]["loss"] == pytest.approx(explicit["models"][0]["heldout"]["loss"], abs=1e-6)


def test_whitespace_replies_and_dropped_examples_are_visible():
    from h1tune.evaluation.loss import LossResult
    from h1tune.evaluation.models import ModelSpec
    from h1tune.evaluation.report import ModelResult, format_table
    from h1tune.evaluation.samples import Prompt, format_samples

    prompts = [Prompt([{"role": "user", "content": "Hi"}], None, None)]
    rows = [{"model": "a", "prompt_index": 0, "reply": "\n\n"}, {"model": "b", "prompt_index": 0, "reply": ""}]
    shown = format_samples(prompts, rows)
    assert "| ⏎⏎" in shown and "| (empty)" in shown
    result = ModelResult(ModelSpec("m", "m", "model"), loss=LossResult(loss=1.0, tokens=10, examples=3, rows=3,
                                                                         dropped=2))
    table = format_table([result])
    assert any(line.split() == ["dropped", "2"] for line in table.splitlines())
