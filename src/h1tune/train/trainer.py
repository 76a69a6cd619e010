"""H1Trainer: the Hugging Face Trainer plus what h1tune guarantees on every run.

A NaN/inf stop, a token-weighted eval loss (h1tune.lm.loss), TII's warmup-stable-exponential
schedule, and atomic checkpoints (staged, marked complete, renamed into place). Under several
processes the eval loss sums over every rank's rows, training rows are split without repeats
(sharding.py), and only the main process publishes checkpoints and writes the final weights.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import torch
from transformers import Trainer

from h1tune.errors import H1tuneError
from h1tune.lm.loss import chunked_lm_loss, final_hidden_states, row_loss_sums
from h1tune.train import recipes, run_dir, sharding
from h1tune.train.context_groups import context_parallel_loss_sum, group_sampler, make_context_group

__all__ = ["H1Trainer", "H1TrainerMixin", "STAGING_DIR"]
log = logging.getLogger("h1tune")

STAGING_DIR = ".staging"


class H1TrainerMixin:
    """What every h1tune trainer adds to a Trainer (the HF one, or TRL's DPO/KTO trainers, which
    subclass it): the NaN stop, the WSD-exponential schedule and atomic checkpoints."""

    def __init__(self, *args, wsd_exponential: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.wsd_exponential = wsd_exponential
        self._check_strategy_engaged()

    def _check_strategy_engaged(self) -> None:
        """accelerate enables FSDP on GPUs only: on CPUs (torchrun, gloo) `fsdp` silently became plain DDP."""
        for asked, engaged, name in ((self.args.fsdp, self.is_fsdp_enabled, "fsdp"),
                                     (self.args.deepspeed, self.is_deepspeed_enabled, "deepspeed")):
            if asked and not engaged:
                raise H1tuneError(f"training.distributed asks for {name}, but accelerate did not engage it on "
                                  f"{self.args.device} with {self.args.world_size} process(es) (it runs FSDP and "
                                  "DeepSpeed on GPUs only); use training.distributed: ddp here")

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            raise H1tuneError(
                f"loss became {loss.item()} at step {self.state.global_step + 1}; training stopped. The last "
                "complete checkpoint is kept. Lower training.learning_rate, check the data, or use fp32")
        return loss

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None and self.wsd_exponential:
            self.lr_scheduler = recipes.build_wsd_exponential(
                optimizer or self.optimizer, self.args.get_warmup_steps(num_training_steps), num_training_steps)
            self._created_lr_scheduler = True
        return super().create_scheduler(num_training_steps, optimizer)

    def save_final(self, path) -> None:
        """The trained weights of the final directory: the adapter (PEFT format) or the full model.

        Every rank calls it: gathering sharded weights (FSDP, ZeRO-3) is collective. The main
        process writes.
        """
        if self.is_fsdp_enabled:  # full weights gathered from the shards, whatever the checkpoint format
            state_dict = self.accelerator.get_state_dict(self.model)
            if self.is_world_process_zero():
                self.accelerator.unwrap_model(self.model).save_pretrained(path, state_dict=state_dict,
                                                                           safe_serialization=True)
        elif self.is_deepspeed_enabled:  # the Trainer's ZeRO gather (16-bit weights; PEFT: the adapter)
            self.save_model(str(path))
        elif self.is_world_process_zero():
            self.accelerator.unwrap_model(self.model).save_pretrained(path, safe_serialization=True)

    def _save_checkpoint(self, model, trial):
        """Write the checkpoint into a staging dir, then publish it with a marker and one rename.

        Under several processes every rank writes its part (its RNG state; its shard under FSDP or
        ZeRO) into the same staging dir; the main process publishes only after all of them finished.
        """
        root = Path(self.args.output_dir)
        staging_root = root / STAGING_DIR
        main = self.is_world_process_zero()
        if main:
            shutil.rmtree(staging_root, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        keep = self.args.save_total_limit
        self.args.output_dir, self.args.save_total_limit = str(staging_root), None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir, self.args.save_total_limit = str(root), keep
        self.accelerator.wait_for_everyone()
        if main:
            name = f"checkpoint-{self.state.global_step}"
            run_dir.publish_checkpoint(staging_root / name, root / name)
            shutil.rmtree(staging_root, ignore_errors=True)
            run_dir.rotate_checkpoints(root, keep)
        self.accelerator.wait_for_everyone()


class H1Trainer(H1TrainerMixin, Trainer):
    """The HF Trainer with h1tune's guarantees (H1TrainerMixin), a chunked training loss, a token-weighted
    evaluation, and rows split over `context_parallel` ranks (context_groups.py)."""

    def __init__(self, *args, context_parallel: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.context = None
        if context_parallel > 1:
            self.context = make_context_group(context_parallel)
            log.info("context parallelism: each packed row split over %d ranks (slice %d here), %d data-parallel "
                     "group(s)", self.context.size, self.context.rank, self.context.data_parallel)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The training loss from the final hidden states, a chunk of tokens at a time (loss.chunked_lm_loss).

        transformers' loss needs the whole [tokens, vocab] logits and their gradient: ~0.8 GB at 2x1024
        tokens of a 32k vocabulary, the largest single item of a LoRA step's peak. The model runs
        through every wrapper as usual, with `logits_to_keep=1`; a hook takes the normed hidden states.
        Same value and gradients as the model's own loss, its normalisation included (a sum divided by
        the Trainer's `num_items_in_batch`, or a mean). Under FSDP/DeepSpeed the lm_head's weights
        exist whole only inside the wrapped forward, so there the model computes its loss itself.
        """
        causal_lm = _causal_lm(self.accelerator.unwrap_model(model))
        if (return_outputs or not model.training or causal_lm is None or self.is_fsdp_enabled
                or self.is_deepspeed_enabled or self.label_smoother is not None or self.compute_loss_func):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        scale = 1
        if self.context is not None:  # this rank's slice; DDP averages what the group must sum
            total, count = context_parallel_loss_sum(model, causal_lm, inputs, self.context,
                                                     self.processing_class.pad_token_id)
            scale = self.context.size
        else:
            total, count = self._chunked_loss_sum(model, causal_lm, inputs)
        if not (self.model_accepts_loss_kwargs and num_items_in_batch is not None):
            return total / max(count, 1) * scale
        loss = total / torch.as_tensor(num_items_in_batch).to(total.device) * scale
        if self.args.average_tokens_across_devices:  # as Trainer.compute_loss: the mean over ranks undoes it
            loss = loss * self.accelerator.num_processes
        return loss

    @staticmethod
    def _chunked_loss_sum(model, causal_lm, inputs: dict) -> tuple[torch.Tensor, int]:
        hidden = final_hidden_states(model, causal_lm, **{k: v for k, v in inputs.items() if k != "labels"})
        return chunked_lm_loss(hidden, inputs["labels"], causal_lm.lm_head, causal_lm.model.lm_head_multiplier)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """With context parallelism the group's exchanges stay on through backward (checkpointing re-runs
        the forward there)."""
        if self.context is None:
            return super().training_step(model, inputs, num_items_in_batch)
        from h1tune import context_parallel

        with context_parallel.enabled(self.context.group, model=_causal_lm(self.accelerator.unwrap_model(model))):
            return super().training_step(model, inputs, num_items_in_batch)

    def get_train_dataloader(self):
        """Several processes: every real row once per epoch, in the single-process order (sharding.py)."""
        if self.args.world_size == 1 or self.train_dataset is None:
            return super().get_train_dataloader()
        if self.context is not None:
            dataset, sampler = group_sampler(self.train_dataset, self._train_batch_size, self.context,
                                             self.args.data_seed)
        else:
            dataset, sampler = sharding.padded_sampler(self.train_dataset, self._train_batch_size,
                                                       self.args.world_size, self.args.data_seed)
        return self._get_dataloader(dataset=dataset, description="Training", batch_size=self._train_batch_size,
                                    sampler_fn=lambda _: sampler, is_training=True)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """Loss summed over every labelled token of the eval set, divided once: independent of batch
        size and padding (the Trainer's default averages per-batch means) and of the number of ranks.

        Each rank evaluates its share of the rows; `gather_for_metrics` collects every rank's per-row
        sums and drops the rows accelerate repeated to give all ranks equal batches.
        """
        dataloader = self.get_eval_dataloader(eval_dataset)
        model = self.model  # not the DDP wrapper: evaluation needs no gradient sync
        was_training = model.training
        model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64)
        tokens = 0
        with torch.no_grad():
            for batch in dataloader:
                batch = self._prepare_inputs(batch)
                row_loss, row_tokens = self.accelerator.gather_for_metrics(row_loss_sums(model, batch))
                loss_sum += row_loss.sum().cpu()
                tokens += int(row_tokens.sum())
        model.train(was_training)
        mean = (loss_sum / max(tokens, 1)).item()
        metrics = {f"{metric_key_prefix}_loss": mean,
                   f"{metric_key_prefix}_perplexity": math.exp(min(mean, 50.0)),
                   f"{metric_key_prefix}_tokens": tokens}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def _causal_lm(model):
    """The FalconH1ForCausalLM inside `model` (peft wraps it), or None for any other model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    has_parts = hasattr(inner, "lm_head") and hasattr(getattr(inner, "model", None), "lm_head_multiplier")
    return inner if has_parts else None
