"""Preference tuning (DPO, KTO): the batches and the trainer for `training.objective: dpo | kto`.

    h1tune train dpo.yaml          # training.objective: dpo, data: preference pairs

`h1tune train` and `h1tune check` run the same pipeline as SFT (train/run.py, preflight.py): data
checked and summarised before any weights load, the adapter policy and its probe, metrics.jsonl,
progress bar, atomic checkpoints, resume, NaN stop. What differs is built here: TRL's collators
(or h1tune's exact packing for DPO, packed_pairs.py), TRL's DPOConfig/KTOConfig from the recipe,
and the reference model (reference.py explains the choices).
"""

from __future__ import annotations

import logging
import random
from functools import partial
from typing import Any

from h1tune.config import H1tuneConfig
from h1tune.data import pad_collate
from h1tune.data.render import IGNORE_INDEX
from h1tune.lm.batching import Batches, probe_examples

log = logging.getLogger("h1tune")


def _sequences(example: dict[str, Any]) -> list[list[int]]:
    """The token sequences an example puts through the model: prompt + each completion."""
    sides = ("chosen_ids", "rejected_ids") if "chosen_ids" in example else ("completion_ids",)
    return [example["prompt_ids"] + example[side] for side in sides]


def _as_sft(example: dict[str, Any]) -> dict[str, list[int]]:
    """The first completion as an SFT example (labels on the completion), for the adapter probe."""
    side = "chosen_ids" if "chosen_ids" in example else "completion_ids"
    prompt = example["prompt_ids"]
    return {"input_ids": prompt + example[side], "labels": [IGNORE_INDEX] * len(prompt) + example[side]}


def make_preference_batches(cfg: H1tuneConfig, tokenizer, data) -> Batches:
    """Datasets and collators for TRL's trainers: padded, or exactly packed DPO rows (data.packing).

    The probe gets short chosen (KTO: any) completions as SFT examples: it proves each adapter moves
    their log-likelihood, which is what the preference losses are made of.
    """
    from datasets import Dataset

    from h1tune.data.packing import collate_packed, pack_examples

    train, evaluation = list(data.train), list(data.eval)
    if cfg.training.objective == "kto":  # TRL samples KTO batches in order; shuffle once, seeded
        random.Random(cfg.training.seed).shuffle(train)
    pad_id = tokenizer.pad_token_id
    probe = probe_examples([_as_sft(e) for e in train])
    tokens = sum(len(s) for e in train for s in _sequences(e)) / max(1, len(train))
    if cfg.data.packing:
        from h1tune import ssm
        from h1tune.train.packed_pairs import PackedPairCollator

        ssm.install()
        collator = PackedPairCollator(pad_id, cfg.data.max_length)
        probe_collator = partial(collate_packed, pad_token_id=pad_id)
        probe = pack_examples(probe, sum(len(e["input_ids"]) for e in probe))[0]  # one row, boundaries kept
    else:
        collator = _trl_collator(cfg.training.objective, pad_id)
        probe_collator = partial(pad_collate, pad_token_id=pad_id)
    return Batches(Dataset.from_list(train), Dataset.from_list(evaluation) if evaluation else None, collator,
                   tokens, probe, probe_collator, item_tokens=_padded_tokens)


def _padded_tokens(example: dict[str, Any]) -> int:
    """Tokens an example occupies in a padded batch: each of its sequences as long as the longest."""
    sequences = _sequences(example)
    return len(sequences) * max(map(len, sequences))


def _trl_collator(objective: str, pad_id: int):
    if objective == "dpo":
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        return DataCollatorForPreference(pad_token_id=pad_id)
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    return DataCollatorForUnpairedPreference(pad_token_id=pad_id)


def preference_arguments(cfg: H1tuneConfig, kwargs: dict[str, Any], opt: dict[str, Any]):
    """TRL's DPOConfig / KTOConfig: the run's TrainingArguments fields plus the objective's own."""
    common = dict(kwargs, beta=opt["beta"], max_length=None,  # h1tune fitted every sequence to data.max_length
                  prediction_loss_only=True)  # else TRL's eval runs a second forward for logits nobody reads
    if cfg.training.objective == "dpo":
        from trl import DPOConfig

        return DPOConfig(**common, loss_type=opt["loss_type"])
    from trl import KTOConfig

    return KTOConfig(**common, loss_type=opt["loss_type"][0])


def build_preference_trainer(cfg: H1tuneConfig, ready, tokenizer, kwargs: dict, opt: dict, callbacks: list):
    """H1DPOTrainer or H1KTOTrainer on the prepared batches, with the reference model of reference.py."""
    from h1tune.train.preference_trainers import H1DPOTrainer, H1KTOTrainer
    from h1tune.train.reference import reference_model

    args = preference_arguments(cfg, kwargs, opt)
    log.info("%s: loss %s, beta %g, reference: %s", cfg.training.objective, ",".join(opt["loss_type"]), opt["beta"],
             "the base with the adapter disabled" if cfg.adapter.method == "lora" and not cfg.model.adapter
             else "the starting adapter, frozen" if cfg.model.adapter else "a frozen copy of the model")
    trainer_class = H1DPOTrainer if cfg.training.objective == "dpo" else H1KTOTrainer
    return trainer_class(model=ready.model, ref_model=reference_model(cfg, ready.model), args=args,
                         data_collator=ready.batches.collator, train_dataset=ready.batches.train,
                         eval_dataset=ready.batches.eval, processing_class=tokenizer, callbacks=callbacks,
                         wsd_exponential=opt["wsd_exponential"], keep_reference_adapter=bool(cfg.model.adapter))
