"""TRL's DPOTrainer and KTOTrainer with h1tune's guarantees, subclassed as little as possible.

TRL owns the preference losses (every `loss_type` by name), the reference log-probabilities, the
metrics (rewards, margins, accuracies, KL) and the fused LM head (which keeps Falcon-H1's
`lm_head_multiplier`). h1tune adds, through `H1TrainerMixin`: the NaN stop, atomic checkpoints
and the WSD schedule; and here:

- the data arrives tokenized by h1tune (chat template, completion = the assistant span SFT
  trains), so TRL's own tokenization is skipped (`_prepare_dataset`);
- packed DPO batches (`packed_pairs.py`) run the forwards on packed rows;
- with a fresh LoRA adapter the reference is the base with the adapter disabled: TRL adds a
  "ref" copy of any adapter it is handed, which we drop when the adapter is new (it equals the
  base); one continued from an SFT run keeps it, so the reference is the SFT model;
- the final adapter is saved without that reference copy.
"""

from __future__ import annotations

from trl import DPOTrainer, KTOTrainer

from h1tune.train.packed_pairs import PACK_KEYS, packed_forward
from h1tune.train.trainer import H1TrainerMixin

REFERENCE_ADAPTER = "ref"  # the name TRL gives its frozen copy of a continued adapter


class _PreferenceMixin(H1TrainerMixin):
    def __init__(self, *args, keep_reference_adapter: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        peft_config = getattr(self.model, "peft_config", {})
        if REFERENCE_ADAPTER in peft_config and not keep_reference_adapter:
            self.model.delete_adapter(REFERENCE_ADAPTER)  # new LoRA == base: disable adapters instead

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # tokenized by h1tune.data.preference_tokens in TRL's layout

    def save_final(self, path) -> None:
        model = self.accelerator.unwrap_model(self.model)
        adapters = list(getattr(model, "peft_config", {}))
        if REFERENCE_ADAPTER not in adapters:
            return super().save_final(path)
        if self.is_world_process_zero():  # the trained adapter only, not TRL's frozen reference copy
            model.save_pretrained(path, safe_serialization=True,
                                  selected_adapters=[a for a in adapters if a != REFERENCE_ADAPTER])


class H1DPOTrainer(_PreferenceMixin, DPOTrainer):
    """DPOTrainer on h1tune-tokenized pairs, padded or exactly packed."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "pack_index" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        padded = {k: v for k, v in inputs.items() if k not in PACK_KEYS}
        candidates = (self.accelerator.unwrap_model(model), self.model, self.ref_model)
        modules = list({id(m): m for m in candidates if m is not None}.values())
        with packed_forward(modules, inputs, self.processing_class.pad_token_id):
            return super().compute_loss(model, padded, return_outputs, num_items_in_batch)


class H1KTOTrainer(_PreferenceMixin, KTOTrainer):
    """KTOTrainer on h1tune-tokenized completions (padded batches)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if not self.calculate_KL:
            return dataset

        # TRL's KL estimate: each completion paired with its batch neighbour's prompt, batches taken
        # in order (its sampler is sequential), as TRL's own _prepare_dataset builds them.
        def rotate(batch):
            batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
            return batch

        return dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)
