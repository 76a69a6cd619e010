"""`h1tune eval`: held-out loss, samples and harness tasks for several models, side by side.

    h1tune eval tiny runs/sft --data heldout.jsonl --output eval.json
    h1tune eval tiny runs/sft --config run.yaml --set data.packing=true --samples prompts.txt --tasks arc_easy

Every argument and input file is checked before the first model loads; then the models are loaded
one at a time (each freed before the next), so two 7B models never share memory.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from h1tune.config import DataConfig, DataSourceConfig, H1tuneConfig
from h1tune.errors import H1tuneError
from h1tune.evaluation.harness import HarnessOptions
from h1tune.evaluation.loss import read_eval_conversations
from h1tune.evaluation.models import ModelSpec, resolve_model
from h1tune.evaluation.report import ModelResult, format_table, write_report
from h1tune.evaluation.samples import Prompt, format_samples, read_prompts, write_samples

log = logging.getLogger("h1tune")
DEFAULT_SAMPLES = "eval_samples.jsonl"


@dataclass
class EvalOptions:
    """What to measure besides the config: the data files, outputs, samples and harness tasks."""

    data: list[str] = field(default_factory=list)  # held-out files; default: the config's eval data
    batch_size: int | None = None                   # default: training.per_device_eval_batch_size
    output: str | None = None                       # the JSON report
    prompts: str | None = None                      # --samples PROMPTS_FILE
    samples_output: str | None = None
    sampling: Any = None                            # h1tune.generate.SamplingConfig; greedy when None
    harness: HarnessOptions | None = None


@dataclass
class EvalReport:
    results: list[ModelResult]
    table: str
    samples: list[dict[str, Any]]
    json_path: Path | None = None
    samples_path: Path | None = None


def eval_data_config(data_cfg: DataConfig, files: list[str]) -> DataConfig:
    """The config's data options with `files` as the eval set (replacing its eval sources)."""
    if not files:
        return data_cfg
    return data_cfg.model_copy(update={"eval": [DataSourceConfig(path=f) for f in files], "eval_fraction": 0.0})


def _samples_path(options: EvalOptions) -> Path:
    if options.samples_output:
        return Path(options.samples_output)
    if options.output:
        return Path(options.output).with_suffix(".samples.jsonl")
    return Path(DEFAULT_SAMPLES)


def _has_eval_data(data_cfg: DataConfig) -> bool:
    return bool(data_cfg.eval) or (bool(data_cfg.train) and data_cfg.eval_fraction > 0)


@dataclass
class Inputs:
    """What every model is measured on, read and checked once."""

    conversations: list | None  # held-out conversations; None = no loss asked for
    prompts: list[Prompt] | None
    task_set: Any = None        # harness.TaskSet


def _check_inputs(cfg: H1tuneConfig, options: EvalOptions, data_cfg: DataConfig) -> Inputs:
    """Read and check every input; fails on any bad one before weights load."""
    wants_loss = _has_eval_data(data_cfg) or not (options.prompts or options.harness)
    conversations = read_eval_conversations(data_cfg, cfg.training.seed) if wants_loss else None
    prompts = read_prompts(options.prompts) if options.prompts else None
    task_set = None
    if options.harness is not None:
        from h1tune.evaluation.harness import load_task_set

        task_set = load_task_set(options.harness.tasks)
    batch = options.batch_size
    if batch is not None and batch < 1:
        raise H1tuneError(f"--batch-size: must be >= 1, got {batch}")
    return Inputs(conversations, prompts, task_set)


def _evaluate_one(spec: ModelSpec, cfg: H1tuneConfig, data_cfg: DataConfig, options: EvalOptions,
                  inputs: Inputs) -> tuple[ModelResult, list[dict]]:
    """Load one model, measure everything asked for, free it."""
    from h1tune.evaluation.models import load_eval_model

    model, tokenizer = load_eval_model(spec, cfg.model)
    result, rows = ModelResult(spec), []
    try:
        batch_size = options.batch_size or cfg.training.per_device_eval_batch_size
        if inputs.conversations is not None:
            from h1tune.evaluation.loss import heldout_loss

            result.loss = heldout_loss(model, tokenizer, inputs.conversations, data_cfg, batch_size)
            log.info("%s: held-out loss %.4f, perplexity %.2f over %d tokens", spec.name, result.loss.loss,
                     result.loss.perplexity, result.loss.tokens)
        if inputs.prompts:
            from h1tune.evaluation.samples import generate_samples
            from h1tune.generate import SamplingConfig

            rows = generate_samples(spec.name, model, tokenizer, inputs.prompts, options.sampling or SamplingConfig())
            result.samples = len(rows)
        if options.harness is not None:
            from h1tune.evaluation.harness import run_tasks

            result.tasks = run_tasks(model, tokenizer, options.harness, inputs.task_set).scores
    finally:
        del model
        _free_memory()
    return result, rows


def _free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def settings_dict(cfg: H1tuneConfig, data_cfg: DataConfig, options: EvalOptions) -> dict[str, Any]:
    """What produced the numbers, for the JSON report."""
    from h1tune import __version__

    data = data_cfg.model_dump(mode="json", include={"eval", "eval_fraction", "max_length", "truncation",
                                                     "packing", "system_prompt", "assistant_only_loss"})
    if not data_cfg.eval:
        data["train"] = [s.path for s in data_cfg.train]
    return {
        "h1tune": __version__, "data": data, "seed": cfg.training.seed,
        "batch_size": options.batch_size or cfg.training.per_device_eval_batch_size,
        "model": cfg.model.model_dump(mode="json", exclude={"name_or_path"}),
        "samples": {"prompts": options.prompts, "sampling": asdict(options.sampling) if options.sampling else None},
        "harness": asdict(options.harness) if options.harness else None,
    }


def run_eval(models: list[str], cfg: H1tuneConfig, options: EvalOptions,
             echo: Callable[[str], None] = print) -> EvalReport:
    """Evaluate each of `models` and print (via `echo`) and write the side-by-side results."""
    if not models:
        raise H1tuneError("MODEL: give at least one model (preset, model or adapter directory, run directory)")
    specs = [resolve_model(m) for m in models]
    data_cfg = eval_data_config(cfg.data, options.data)
    inputs = _check_inputs(cfg, options, data_cfg)

    results, samples = [], []
    for spec in specs:
        log.info("evaluating %s: %s", spec.name, spec.describe())
        result, rows = _evaluate_one(spec, cfg, data_cfg, options, inputs)
        results.append(result)
        samples += rows

    report = EvalReport(results, format_table(results), samples)
    if inputs.prompts:
        report.samples_path = write_samples(_samples_path(options), samples)
        echo(format_samples(inputs.prompts, samples))
        echo(f"samples written to {report.samples_path}\n")
    echo(report.table)
    if options.output:
        report.json_path = write_report(options.output, results, settings_dict(cfg, data_cfg, options))
        echo(f"results written to {report.json_path}")
    return report
