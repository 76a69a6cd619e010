"""DPO numerics on a real tiny Falcon-H1 (CPU, fp32): TRL's sigmoid_norm equals a hand computation,
exact packed batches give the padded loss and gradients, and the LoRA reference shares the base.

The model leaks loudly if anything crosses a sequence boundary (the long-memory SSM of
test_packing_exact.py, chunk size 16 so sequences start mid-chunk), and the LoRA B matrices are
randomised so the policy differs from the reference (a fresh adapter would make every loss log 2).
"""

import pytest
import torch
from datasets import Dataset

from h1tune import ssm
from h1tune.adapters import apply_adapter
from h1tune.config import config_from_dict
from h1tune.presets import build_model, long_memory
from h1tune.train.arguments import trainer_kwargs
from h1tune.train.packed_pairs import PackedPairCollator
from h1tune.train.preference import preference_arguments
from h1tune.train.preference_trainers import H1DPOTrainer
from h1tune.train.reference import reference_model

# (prompt, chosen, rejected) lengths: very different, some a single token
SHAPES = [(3, 40, 2), (25, 1, 30), (1, 7, 7), (12, 18, 3)]
PACK_LENGTH = 64  # several sequences per row, rows of different fill


def _pairs():
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(5, 1000, (n,), generator=g).tolist()  # noqa: E731
    return [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)} for p, c, r in SHAPES]


def _cfg(tmp_path, *, method="lora", loss_type="sigmoid", beta=0.1):
    return config_from_dict({"adapter": {"method": method, "r": 4, "lora_dropout": 0.0},
                             "training": {"objective": "dpo", "loss_type": loss_type, "beta": beta,
                                          "report_to": ["none"]},
                             "output_dir": str(tmp_path)})


def _trainer(cfg, tiny_tokenizer, randomise=True):
    ssm.install()
    model = long_memory(build_model("tiny", seed=0, mamba_chunk_size=16, initializer_range=0.1,
                                     lm_head_multiplier=1.0, ssm_out_multiplier=1.0))
    torch.manual_seed(0)
    model = apply_adapter(model, cfg)
    if randomise and cfg.adapter.method == "lora":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.05)
    kwargs, opt = trainer_kwargs(cfg, 1000, has_eval=False)
    return H1DPOTrainer(model=model, ref_model=reference_model(cfg, model), args=preference_arguments(cfg, kwargs, opt),
                        data_collator=PackedPairCollator(tiny_tokenizer.pad_token_id, PACK_LENGTH),
                        train_dataset=Dataset.from_list(_pairs()), processing_class=tiny_tokenizer)


def _loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def _padded(batch):
    return {k: v for k, v in batch.items() if not k.startswith("pack_")}


# betas that keep gradients O(1), so atol 1e-5 means ~1e-6 relative (IPO at beta 0.1 has gradients ~16)
@pytest.mark.parametrize("loss_type, beta", [("sigmoid", 0.1), ("sigmoid_norm", 5.0), ("ipo", 1.0)])
def test_packed_loss_and_gradients_equal_padded(tmp_path, tiny_tokenizer, loss_type, beta):
    trainer = _trainer(_cfg(tmp_path, loss_type=loss_type, beta=beta), tiny_tokenizer)
    batch = trainer.data_collator(_pairs())
    rows = batch["pack_position_ids"].shape[0]
    assert 1 < rows < 2 * len(SHAPES), "several sequences share rows"
    packed_loss, packed_grads = _loss_and_grads(trainer, batch)
    padded_loss, padded_grads = _loss_and_grads(trainer, _padded(batch))
    assert abs(packed_loss.item() - padded_loss.item()) <= 1e-5, (packed_loss, padded_loss)
    assert packed_loss.item() != pytest.approx(0.6931, abs=1e-3), "policy differs from the reference"
    assert packed_grads.keys() == padded_grads.keys() and len(packed_grads) > 10
    for name in packed_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], atol=1e-5, rtol=0, msg=name)
    assert any(g.abs().max() > 1e-3 for g in padded_grads.values())


def test_packed_rows_keep_sequences_apart(tmp_path, tiny_tokenizer):
    """Control: the same packed rows without seq_idx/position resets give a different loss."""
    trainer = _trainer(_cfg(tmp_path), tiny_tokenizer)
    batch = trainer.data_collator(_pairs())
    exact = trainer.compute_loss(trainer.model, batch).item()
    leaky = dict(batch, pack_seq_idx=torch.zeros_like(batch["pack_seq_idx"]),
                 pack_position_ids=torch.arange(batch["pack_position_ids"].shape[1]).expand_as(batch["pack_position_ids"]))
    assert abs(trainer.compute_loss(trainer.model, leaky).item() - exact) > 1e-3


def _sequence_logps(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids, use_cache=False).logits[0].double()
    per_token = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None])[:, 0]
    return per_token[len(prompt) - 1:].sum()


def test_sigmoid_norm_matches_a_hand_computation(tmp_path, tiny_tokenizer):
    beta = 5.0
    trainer = _trainer(_cfg(tmp_path, loss_type="sigmoid_norm", beta=beta), tiny_tokenizer)
    model = trainer.model
    pairs = _pairs()
    with torch.no_grad():
        loss = trainer.compute_loss(model, _padded(trainer.data_collator(pairs))).item()
        terms = []
        for pair in pairs:
            scores = []
            for side in ("chosen_ids", "rejected_ids"):
                policy = _sequence_logps(model, pair["prompt_ids"], pair[side])
                with model.disable_adapter():
                    reference = _sequence_logps(model, pair["prompt_ids"], pair[side])
                scores.append((policy - reference) / len(pair[side]))  # per-token average log-ratio
            terms.append(-torch.nn.functional.logsigmoid(beta * (scores[0] - scores[1])))
    expected = torch.stack(terms).mean().item()
    assert loss == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert abs(expected - 0.6931) > 1e-2


def _storage_bytes(*modules):
    seen = {}
    for module in modules:
        for p in module.parameters():
            seen[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    return sum(seen.values())


def test_lora_reference_shares_the_base_and_full_fine_tuning_copies_it(tmp_path, tiny_tokenizer):
    lora = _trainer(_cfg(tmp_path / "l"), tiny_tokenizer, randomise=False)
    assert lora.ref_model is None and list(lora.model.peft_config) == ["default"]
    base_bytes = _storage_bytes(build_model("tiny", seed=0))
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in lora.model.named_parameters() if "lora_" in n)
    assert _storage_bytes(lora.model) == base_bytes + adapter_bytes  # no second copy of any weight
    trainable = [n for n, p in lora.model.named_parameters() if p.requires_grad]
    assert trainable == [n for n, _ in lora.model.named_parameters() if ".lora_" in n and ".default." in n]

    full = _trainer(_cfg(tmp_path / "f", method="full"), tiny_tokenizer)
    assert _storage_bytes(full.model, full.ref_model) == 2 * base_bytes  # the counting sees a copy
    assert not any(p.requires_grad for p in full.ref_model.parameters())
