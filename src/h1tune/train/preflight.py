"""The one pre-flight, run by both `h1tune train` and `h1tune check`.

    inputs = check_inputs(cfg)                 # tokenizer, chat template, data: cheap, no weights
    ready = prepare_model(cfg, inputs)          # batches, model + adapter (seeded), the adapter probe

`train` claims its output directory between the two phases, so a bad data file never leaves a
run directory behind; `check` runs both and trains nothing. Both seed before applying the adapter,
so `check` probes exactly the LoRA initialisation that `train` will train.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from h1tune.config import H1tuneConfig
from h1tune.precision import autocast, flush_denormals, fp32_gap, training_precision

log = logging.getLogger("h1tune")


@dataclass
class Inputs:
    """What can be checked without loading weights."""

    tokenizer: Any
    data: Any  # h1tune.data.PreparedData, or PreparedPreference for dpo/kto


@dataclass
class Ready:
    """A model ready to train on its batches, with the probe's findings."""

    batches: Any  # h1tune.lm.batching.Batches
    model: Any
    probe: Any | None  # h1tune.adapters.probe.ProbeReport, None when adapter.probe is off
    precision: Any = None  # h1tune.precision.Precision
    fp32_gap: str | None = None  # bf16 runs: the probe batch's loss in bf16 vs fp32, in words


# report_to names -> the module that must be importable (the Trainer fails late, after the probe, otherwise)
INTEGRATIONS = {"wandb": "wandb", "tensorboard": "tensorboard", "mlflow": "mlflow", "comet_ml": "comet_ml",
                "neptune": "neptune", "clearml": "clearml", "dvclive": "dvclive", "trackio": "trackio"}


def check_integrations(report_to: list[str]) -> None:
    """Every `training.report_to` logger must be installed, checked before anything is written."""
    import importlib.util

    from h1tune.errors import ConfigError

    problems = []
    for name in report_to:
        if name in ("auto", "none", "all"):
            continue
        module = INTEGRATIONS.get(name)
        if module is None:
            problems.append(f"training.report_to: unknown logger {name!r}; choose from "
                            f"{', '.join(['auto', 'none', *INTEGRATIONS])}")
        elif importlib.util.find_spec(module) is None:
            problems.append(f"training.report_to: {name!r} is not installed; `pip install {module}`, or remove "
                            f"it (auto = tensorboard when installed)")
    if problems:
        raise ConfigError(problems)


def check_inputs(cfg: H1tuneConfig, show=print) -> Inputs:
    """Loggers, the model's config.json, tokenizer and chat template, then every data file, validated and
    tokenised. No weights load and nothing is written."""
    from h1tune.data import prepare_datasets
    from h1tune.data.render import check_template_renders
    from h1tune.model import load_tokenizer, read_model_config

    check_integrations(cfg.training.report_to)
    read_model_config(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    check_template_renders(tokenizer)
    if cfg.training.objective == "sft":
        data = prepare_datasets(cfg.data, tokenizer, seed=cfg.training.seed)
    elif cfg.training.objective == "grpo":
        from h1tune.data.prompts import prepare_prompts
        from h1tune.train.grpo import check_rewards, reward_functions

        data = prepare_prompts(cfg.data, tokenizer, cfg.training.seed, cfg.training.max_completion_length)
        check_rewards(reward_functions(cfg), data.train)
    else:
        from h1tune.data.preference_prepare import prepare_preference_data

        data = prepare_preference_data(cfg.data, tokenizer, seed=cfg.training.seed, objective=cfg.training.objective)
    show(data.summary.format())
    return Inputs(tokenizer, data)


def prepare_model(cfg: H1tuneConfig, inputs: Inputs, probe: bool | None = None) -> Ready:
    """Batches, the model with its adapter (seeded like training), and the probe.

    `probe` None follows adapter.probe; `check` always probes.
    """
    from transformers import set_seed

    from h1tune.adapters import apply_adapter, frozen_base
    from h1tune.adapters.probe import ProbeError, ProbeReport, probe_adapters
    from h1tune.model import load_model
    from h1tune.lm.batching import make_batches
    from h1tune.train.strategies import shards_4bit_weights

    if cfg.training.objective == "sft":
        batches = make_batches(cfg.data, inputs.tokenizer, inputs.data.train, inputs.data.eval)
    elif cfg.training.objective == "grpo":
        from h1tune.train.grpo import make_grpo_batches

        batches = make_grpo_batches(cfg, inputs.tokenizer, inputs.data)
    else:
        from h1tune.train.preference import make_preference_batches

        batches = make_preference_batches(cfg, inputs.tokenizer, inputs.data)
    precision = training_precision(cfg)
    log.info("precision: %s", precision.describe())
    flush_denormals()
    model = load_model(cfg.model.model_copy(update={"dtype": precision.weights}), shard_4bit=shards_4bit_weights(cfg))
    model.config.use_cache = False
    set_seed(cfg.training.seed)  # LoRA's initial A matrices come from the RNG: same seed, same run
    model = apply_adapter(model, cfg)
    stored = frozen_base.keep_frozen_in_bf16(model, cfg, precision)
    if stored:
        log.info("frozen base: %d weight matrices kept in the checkpoint's bf16 (half their memory), computed "
                 "in fp32; model.dtype: float32 keeps them fp32", stored)
    report = None
    if cfg.adapter.probe if probe is None else probe:  # LoRA: every adapter; full fine-tuning: every module with trainable weights
        if not batches.probe_items:
            raise ProbeError(ProbeReport(rows=[], loss=0.0, kind=cfg.adapter.method, seconds=0.0, tokens=0,
                                         unmeasured="no training example has a labelled token to probe on"),
                             "adapter probe: could not measure: no training example has a labelled token "
                             "(this is the data's problem, not the adapters'); check data.assistant_only_loss "
                             "and that rows have assistant turns (`h1tune check CONFIG --show-example 2`)")
        with autocast(precision):  # the path training runs
            report = probe_adapters(model, batches.probe_batch())
    gap = fp32_gap(model, batches.probe_batch(), precision) if batches.probe_items else None
    return Ready(batches, model, report, precision, gap)


def run_check(cfg: H1tuneConfig, show=print, probe_table: bool = False, show_examples: int = 0) -> Ready:
    """`h1tune check`: both phases, the probe as in training (a line per group, or the whole table),
    and optionally the first rendered examples with the trained tokens marked."""
    from h1tune.data.render import mark_trained_tokens

    from pathlib import Path

    from h1tune.train.run_dir import check_output_path

    check_output_path(Path(cfg.output_dir))  # train would refuse it before writing anything
    inputs = check_inputs(cfg, show)
    show("chat template: ok")
    for index, example in enumerate(list(inputs.data.train)[:show_examples]):
        show(f"--- example {index + 1} (trained tokens between [[ and ]]) ---")
        show(render_example(inputs.tokenizer, example, mark_trained_tokens))
    ready = prepare_model(cfg, inputs)
    show(f"precision: {ready.precision.describe()}" + (f"; {ready.fp32_gap}" if ready.fp32_gap else ""))
    if ready.probe is None:
        show("adapter probe: off (adapter.probe: false)")
    elif probe_table:
        show(ready.probe.format_table())
    else:
        show(ready.probe.summary_line())
        for line in ready.probe.format_group_lines():
            show(f"  {line}")
    return ready


def render_example(tokenizer, example: dict, mark) -> str:
    """One prepared example as text with its trained tokens marked: an SFT example, a DPO pair (prompt,
    then each completion scored), a KTO completion with its label, or a GRPO prompt and its columns."""
    if "input_ids" in example:
        return mark(tokenizer, example["input_ids"], example["labels"])
    if "prompt" in example:  # grpo: the prompt as the model sees it (nothing is trained on it), then the columns
        text = tokenizer.apply_chat_template(example["prompt"], tools=example.get("tools"), tokenize=False,
                                             add_generation_prompt=True)
        columns = {k: v for k, v in example.items() if k != "prompt"}
        return f"{text}\n(columns for the rewards: {columns})"
    prompt = example["prompt_ids"]

    def side(ids: list[int]) -> str:
        return mark(tokenizer, prompt + ids, [-100] * len(prompt) + list(ids))

    if "chosen_ids" in example:
        return f"chosen:\n{side(example['chosen_ids'])}\nrejected:\n{side(example['rejected_ids'])}"
    label = "desirable" if example["label"] else "undesirable"
    return f"label: {label}\n{side(example['completion_ids'])}"
