"""From `data:` config to tokenized preference examples (DPO pairs, KTO completions) plus their summary.

    prepared = prepare_preference_data(cfg.data, tokenizer, seed=cfg.training.seed, objective="dpo")
    print(prepared.summary.format())

Sources are read, weighted and split exactly like SFT data (`sources.py`, `prepare.py`); only the
row formats differ (`preference.py`). Every bad row fails here with its file:line or row, before a
model is loaded. DPO needs paired data; KTO takes unpaired data and also pairs, which it unpairs
(chosen desirable, rejected undesirable) after the eval split, so both halves of a pair stay together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from h1tune.data.formats import detect_format
from h1tune.data.prepare import hold_out
from h1tune.data.preference import (
    PREFERENCE_FORMATS, PreferencePair, describe_formats, detect_preference_format, expected_keys, is_paired,
    parse_preference_row,
)
from h1tune.data.preference_summary import PreferenceStats, PreferenceSummary
from h1tune.data.preference_tokens import encode_pair, encode_unpaired, fit_pair, fit_unpaired
from h1tune.data.sources import SourceData, apply_weight, parse_rows, source_rows
from h1tune.data.summary import SourceStats
from h1tune.errors import DataError

log = logging.getLogger("h1tune")
OBJECTIVES = ("dpo", "kto")


@dataclass
class PreparedPreference:
    """Tokenized examples (TRL's layout, see preference_tokens.py) and the summary that describes them."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    summary: PreferenceSummary


def _source_format(name: str, fmt: str, first: Any, objective: str) -> str:
    """The source's preference format (detected or given), checked against the objective."""
    if fmt == "auto":
        fmt = detect_preference_format(first)
        if fmt is None:
            keys = ", ".join(repr(k) for k in first) if isinstance(first, dict) else type(first).__name__
            sft = detect_format(first)
            hint = (f"they are SFT data (format {sft!r}): set training.objective: sft to fine-tune on them, or give"
                    if sft else "give")
            raise DataError(f"{name}: training.objective {objective} needs preference data, but the first row's "
                            f"keys ({keys}) match no preference format; {hint} rows in one of — "
                            f"{describe_formats()}; or set `format:` on this source")
    if fmt not in PREFERENCE_FORMATS:
        raise DataError(f"{name}: format {fmt!r} is SFT data; training.objective {objective} needs one of "
                        f"{', '.join(PREFERENCE_FORMATS)} (or format: auto)")
    if objective == "dpo" and not is_paired(fmt):
        raise DataError(f"{name}: format {fmt!r} is unpaired (KTO) data, one completion and a label per row; DPO "
                        "needs a chosen and a rejected completion per prompt. Set training.objective: kto")
    return fmt


def read_preference_source(source, objective: str) -> SourceData:
    """Read and parse one `DataSourceConfig`; every bad row is reported in one DataError."""
    name, rows = source_rows(source)
    fmt = _source_format(name, source.format, rows[0][0], objective)
    examples = parse_rows(name, rows, fmt, parse_preference_row, detected=source.format == "auto",
                          expected=expected_keys)
    return SourceData(path=name, format=fmt, weight=source.weight, conversations=examples)


def tokenize_preference_split(examples: list, tokenizer, data_cfg,
                              objective: str) -> tuple[list[dict], PreferenceStats]:
    """Tokenize and fit every example (KTO unpairs pairs here); count what was kept, cut and dropped."""
    stats = PreferenceStats()
    out = []
    for example in examples:
        if objective == "dpo":
            fitted = fit_pair(encode_pair(example, tokenizer, data_cfg), data_cfg.max_length, data_cfg.truncation)
            results = [fitted]
        else:
            singles = example.unpaired() if isinstance(example, PreferencePair) else [example]
            results = [fit_unpaired(encode_unpaired(s, tokenizer, data_cfg), data_cfg.max_length, data_cfg.truncation)
                       for s in singles]
        for fitted in results:
            if fitted.example is None:
                stats.dropped[fitted.reason] += 1
                continue
            out.append(fitted.example)
            stats.add(fitted.example, fitted.truncated)
    return out, stats


def _mix(sources: list[SourceData], parts: list[list], split: str, seed: int,
         objective: str) -> tuple[list, list[SourceStats]]:
    """Weighted examples of each source, in order, and one summary row per source (as SFT mixes them)."""
    mixed_all, stats = [], []
    for index, (source, part) in enumerate(zip(sources, parts)):
        mixed = apply_weight(part, source.weight, seed, key=f"{split}:{index}:{source.path}")
        pairs = sum(isinstance(e, PreferencePair) for e in mixed)
        stats.append(SourceStats(split, source.path, source.format, len(source.conversations), source.weight,
                                 len(mixed), unpaired=pairs if objective == "kto" else 0))
        mixed_all += mixed
    return mixed_all, stats


def prepare_preference_data(data_cfg, tokenizer, seed: int, objective: str) -> PreparedPreference:
    """Read, mix, split, tokenize and summarise the `data:` section for DPO or KTO."""
    if objective not in OBJECTIVES:
        raise DataError(f"training.objective: preference data is for {' or '.join(OBJECTIVES)}, got {objective!r}")
    if not data_cfg.train:
        raise DataError("data.train: no training data; set it to a preference file (json, jsonl, csv, parquet) "
                        "or a Hugging Face dataset id")
    train_sources = [read_preference_source(s, objective) for s in data_cfg.train]
    eval_sources = [read_preference_source(s, objective) for s in data_cfg.eval]
    held_out: list = []
    train_parts = [s.conversations for s in train_sources]
    if not eval_sources and data_cfg.eval_fraction > 0:
        train_parts, held_out = hold_out(train_sources, data_cfg.eval_fraction, seed)
    train_rows, source_stats = _mix(train_sources, train_parts, "train", seed, objective)
    eval_rows, eval_stats_rows = _mix(eval_sources, [s.conversations for s in eval_sources], "eval", seed,
                                      objective)
    eval_rows = held_out + eval_rows
    if not train_rows:
        raise DataError("data.train: the sources give no rows after weighting; raise their `weight`")

    train, train_stats = tokenize_preference_split(train_rows, tokenizer, data_cfg, objective)
    evaluation, eval_stats = (tokenize_preference_split(eval_rows, tokenizer, data_cfg, objective)
                              if eval_rows else ([], None))
    summary = PreferenceSummary(objective=objective, sources=source_stats + eval_stats_rows, train=train_stats,
                                eval=eval_stats, max_length=data_cfg.max_length, truncation=data_cfg.truncation,
                                eval_held_out=len(held_out))
    warning = summary.drop_warning()
    if warning:
        log.warning("%s", warning)
    if not train:
        raise DataError(f"data.train: no {objective} examples left ({warning}); check data.max_length "
                        f"({data_cfg.max_length}) and data.truncation")
    if objective == "kto" and train_stats.desirable in (0, train_stats.examples):
        kind = "desirable" if train_stats.desirable == 0 else "undesirable"
        log.warning("data.train: no %s examples; KTO then only pushes one way. Check the `label` / `kto_tag` "
                    "values if that is not intended", kind)
    return PreparedPreference(train=train, eval=evaluation, summary=summary)
