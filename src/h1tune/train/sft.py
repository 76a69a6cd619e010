"""Supervised fine-tuning: `training.objective: sft` (the default), on the Hugging Face Trainer.

    h1tune train examples/quickstart.yaml

The run itself (data, model, probe, checkpoints, saving) is run.py's and the same for every objective;
this module is what SFT adds: H1Trainer (trainer.py: the chunked, token-weighted loss over assistant-only
labels, exact packing) and how much of the logits the memory plan must count.
"""

from __future__ import annotations

from transformers import TrainingArguments

from h1tune.config import H1tuneConfig
from h1tune.train.trainer import H1Trainer


def build_sft_trainer(cfg: H1tuneConfig, ready, tokenizer, kwargs: dict, opt: dict, callbacks: list) -> H1Trainer:
    batches = ready.batches
    return H1Trainer(model=ready.model, args=TrainingArguments(**kwargs), train_dataset=batches.train,
                     eval_dataset=batches.eval, data_collator=batches.collator, processing_class=tokenizer,
                     callbacks=callbacks, wsd_exponential=opt["wsd_exponential"],
                     context_parallel=cfg.training.context_parallel)


def sft_logit_tokens(cfg: H1tuneConfig, model) -> int | None:
    """SFT on one process or DDP computes the loss a chunk at a time (H1Trainer): only one chunk's logits
    exist; the other objectives (TRL's heads) and sharded strategies are counted whole (None)."""
    from h1tune.lm.loss import CHUNK_LOGIT_BYTES

    if cfg.training.objective != "sft" or cfg.training.distributed not in ("none", "ddp"):
        return None
    return max(1, CHUNK_LOGIT_BYTES // (4 * model.config.vocab_size))
