"""The one pre-flight, run by both `h1tune train` and `h1tune check`.

    inputs = check_inputs(cfg)                 # tokenizer, chat template, data: cheap, no weights
    ready = prepare_model(cfg, inputs)          # batches, model + adapter (seeded), the adapter probe

`train` claims its output directory between the two phases, so a bad data file never leaves a
run directory behind; `check` runs both and trains nothing. Both seed before applying the adapter,
so `check` probes exactly the LoRA initialisation that `train` will train.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from h1tune.config import H1tuneConfig


@dataclass
class Inputs:
    """What can be checked without loading weights."""

    tokenizer: Any
    data: Any  # h1tune.data.PreparedData


@dataclass
class Ready:
    """A model ready to train on its batches, with the probe's findings."""

    batches: Any  # h1tune.train.batching.Batches
    model: Any
    probe: Any | None  # h1tune.adapters.probe.ProbeReport, None when adapter.probe is off


def check_inputs(cfg: H1tuneConfig, show=print) -> Inputs:
    """Tokenizer and chat template, then every data file, validated and tokenised (no weights)."""
    from h1tune.data import prepare_datasets
    from h1tune.data.render import check_template_renders
    from h1tune.model import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    check_template_renders(tokenizer)
    data = prepare_datasets(cfg.data, tokenizer, seed=cfg.training.seed)
    show(data.summary.format())
    return Inputs(tokenizer, data)


def prepare_model(cfg: H1tuneConfig, inputs: Inputs, probe: bool | None = None) -> Ready:
    """Batches, the model with its adapter (seeded like training), and the probe.

    `probe` None follows adapter.probe; `check` always probes.
    """
    from transformers import set_seed

    from h1tune.adapters import apply_adapter
    from h1tune.adapters.probe import probe_adapters
    from h1tune.model import load_model
    from h1tune.train.batching import make_batches

    batches = make_batches(cfg.data, inputs.tokenizer, inputs.data.train, inputs.data.eval)
    model = load_model(cfg.model)
    model.config.use_cache = False
    set_seed(cfg.training.seed)  # LoRA's initial A matrices come from the RNG: same seed, same run
    model = apply_adapter(model, cfg)
    report = None
    if cfg.adapter.probe if probe is None else probe:  # LoRA: every adapter; full fine-tuning: every module with trainable weights
        report = probe_adapters(model, batches.probe_batch())
    return Ready(batches, model, report)


def run_check(cfg: H1tuneConfig, show=print) -> Ready:
    """`h1tune check`: both phases and the probe table; raises H1tuneError on the first problem."""
    inputs = check_inputs(cfg, show)
    show("chat template: ok")
    ready = prepare_model(cfg, inputs, probe=True)
    if ready.probe is not None:
        show(ready.probe.format_table())
    return ready
