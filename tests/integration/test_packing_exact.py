"""Packed == unpacked on a real Falcon-H1 (CPU, fp32): logits, per-document loss and every gradient.

The model is built to leak loudly if anything crosses a boundary: attention and a long-memory
SSM (|A| in [0.01, 0.1], dt_bias -3), ssm_out_multiplier 1, init std 0.1, and mamba_chunk_size
16 so documents start mid-chunk and span chunks. Tolerances: atol 1e-5 plus rtol 1e-5 — logits
reach ~7.5 here, and transformers' own path already differs by ~9e-6 between a document run
alone and the same (causally untouched) first document of a packed row (matmul blocking).
"""

import pytest
import torch

import transformers.models.falcon_h1.modeling_falcon_h1 as mf
from h1tune import ssm
from h1tune.data.packing import collate_packed, pack_examples
from h1tune.presets import build_model, long_memory

TOL = dict(atol=1e-5, rtol=1e-5)
# with chunk 16: starts at 0, 7, 8 (mid-chunk), 28 (spans 32 and 48), 63 (1 token, chunk end), 64, 65
LENGTHS = [7, 1, 20, 35, 1, 1, 9]


@pytest.fixture(scope="module")
def model():
    ssm.install()
    return long_memory(build_model(
        "tiny", seed=0, mamba_chunk_size=16, initializer_range=0.1, lm_head_multiplier=1.0, ssm_out_multiplier=1.0
    ))


@pytest.fixture(scope="module")
def docs():
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(5, 1000, (n,), generator=g).tolist()} for n in LENGTHS]


def _alone(model, doc):
    return model(input_ids=torch.tensor([doc["input_ids"]]), use_cache=False).logits[0]


def _token_losses(logits, labels):
    """Per-target cross-entropy with the model's own shift (logit t predicts label t+1)."""
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[1:]
    return torch.nn.functional.cross_entropy(logits, shifted, reduction="none")[shifted != -100]


def test_packed_logits_and_loss_equal_each_document_alone(model, docs):
    ssm.install()
    batch = collate_packed(docs)
    with torch.no_grad():
        out = model(**batch, use_cache=False)
        alone = [_alone(model, d) for d in docs]
    torch.testing.assert_close(out.logits[0], torch.cat(alone), **TOL)

    start, per_doc = 0, []
    for doc, logits in zip(docs, alone):
        n = len(doc["input_ids"])
        packed_doc = _token_losses(out.logits[0, start:start + n], batch["labels"][0, start:start + n])
        single = _token_losses(logits, torch.tensor(doc["input_ids"]))
        torch.testing.assert_close(packed_doc, single, **TOL)
        per_doc.append(single)
        start += n
    torch.testing.assert_close(out.loss, torch.cat(per_doc).mean(), **TOL)


def test_packed_gradients_equal_the_unpacked_batch(model, docs):
    ssm.install()
    model.train()  # the training path: the fused call first, then the torch conv and scan
    try:
        batch = collate_packed(docs)
        model.zero_grad()
        model(**batch, use_cache=False).loss.backward()
        packed = {n: p.grad.clone() for n, p in model.named_parameters()}

        model.zero_grad()
        targets = sum(len(d["input_ids"]) - 1 for d in docs)
        for doc in docs:
            ids = torch.tensor([doc["input_ids"]])
            if ids.shape[1] > 1:  # a 1-token document has no target
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                (loss * (ids.shape[1] - 1) / targets).backward()
        for name, param in model.named_parameters():
            torch.testing.assert_close(packed[name], param.grad, **TOL, msg=name)
    finally:
        model.zero_grad()
        model.eval()


def test_batched_rows_with_a_padding_document_equal_each_document_alone(model, docs):
    ssm.install()
    rows, plan = pack_examples(docs, max_length=40)
    assert len(rows) > 1 and 0 < plan.fill_ratio <= 1
    batch = collate_packed(rows)
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
        for r, row in enumerate(plan.rows):
            want = torch.cat([_alone(model, docs[i]) for i in row])
            torch.testing.assert_close(logits[r, : len(want)], want, **TOL)


def test_without_h1tune_the_packed_row_leaks(model, docs):
    """Control: the test above would catch a leak. transformers' path refuses seq_idx, and
    without it the SSM and conv state cross documents."""
    batch = collate_packed(docs)
    ssm.uninstall()
    try:
        with pytest.raises(ValueError, match="can't keep packed sequences apart"):
            model(**batch, use_cache=False)
        no_seq = {k: v for k, v in batch.items() if k != "seq_idx"}
        with torch.no_grad():
            leaked = model(**no_seq, use_cache=False).logits[0]
            alone = torch.cat([_alone(model, d) for d in docs])
        leak = (leaked - alone).abs().max().item()
        assert leak > 0.1, leak
        assert (leaked[: LENGTHS[0]] - alone[: LENGTHS[0]]).abs().max() < 1e-4  # the first document is untouched
    finally:
        ssm.install()


@pytest.mark.parametrize("long_memory", [True, False])
def test_h1tune_path_equals_transformers_on_unpacked_input(model, long_memory):
    net = model if long_memory else build_model("tiny", seed=0, mamba_chunk_size=16)
    ids = torch.randint(5, 1000, (2, 45), generator=torch.Generator().manual_seed(3))
    results = []
    for install in (True, False):
        (ssm.install if install else ssm.uninstall)()
        net.zero_grad()
        out = net(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}))
    ssm.install()
    net.zero_grad()
    (ours, our_grads), (theirs, their_grads) = results
    torch.testing.assert_close(ours, theirs, **TOL)
    for name in our_grads:
        torch.testing.assert_close(our_grads[name], their_grads[name], **TOL, msg=name)
    assert mf.mamba2_chunk_scan.__name__ == "mamba_chunk_scan_combined"  # installed again for later tests
