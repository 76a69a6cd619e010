"""Step 3: packed == unpacked with `seq_idx` on the kernels that run, and h1tune's kernels vs the real ones.

Model part: a Falcon-H1 made to leak loudly if anything crosses a document boundary (long-memory
SSM: |A| in [0.01, 0.1], dt_bias -3, ssm_out_multiplier 1, init std 0.1, as in
tests/integration/test_packing_exact.py), seven documents packed
into one row with h1tune's collator (position_ids reset, int32 seq_idx), documents starting
mid-chunk and spanning chunks. Its logits must equal each document run alone, in train mode (the
fused kernel on a GPU) and eval mode (causal_conv1d + the SSD scan), in fp32 and bf16. The
control drops seq_idx: the state then leaks, and that error must exceed the tolerance, or the
check could not fail. Kernel part: kernel_match.py.

Tolerances are on max|Δlogit| / max|logit|: fp32 5e-3 (Triton's dots run in TF32; the CPU path
measured 2e-6), bf16 1e-1: on the CPU path bf16 noise measured 1.8e-2 (dry-run shape) and 2.8e-2
(the GPU run's mixer shape), with 1.6e-2 already on the first document, which nothing precedes
(so only rounding differs), while the leak without seq_idx measured 0.93 and 1.0.
"""

from __future__ import annotations

from gpu_steps.common import Ctx, StepResult, rel_err

MODEL_TOL = {"float32": 5e-3, "bfloat16": 1e-1}
# Documents start mid-chunk, span several chunks, and include 1- and 2-token documents.
LENGTHS = {"cuda": ([37, 1, 150, 200, 1, 2, 90], 128), "cpu": ([13, 1, 40, 70, 1, 2, 30], 32)}
# On a GPU the mixer takes the 0.5B shape's head_dim, d_state and chunk, so the Triton kernels run
# with the configurations step 1 autotuned (and the ones training uses).
MIXER = {"cuda": {"mamba_n_heads": 4, "mamba_d_head": 64, "mamba_d_state": 128}, "cpu": {}}


def leaky_model(chunk: int, **mixer):
    """The tiny preset with a long-memory SSM: a boundary leak moves the logits by about their size."""
    import torch

    from h1tune.presets import build_model

    model = build_model("tiny", seed=0, mamba_chunk_size=chunk, initializer_range=0.1, lm_head_multiplier=1.0,
                        ssm_out_multiplier=1.0, **mixer)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "A_log") and hasattr(module, "dt_bias"):
                module.A_log.copy_(torch.log(torch.empty(module.A_log.shape).uniform_(0.01, 0.1, generator=gen)))
                module.dt_bias.fill_(-3.0)
    return model


def _documents(lengths: list[int]) -> list[dict]:
    import torch

    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(5, 1000, (n,), generator=gen).tolist()} for n in lengths]


def _logits(model, device: str, train: bool, **batch):
    import torch

    model.train(train)
    with torch.no_grad():
        batch = {k: v.to(device) for k, v in batch.items()}
        return model(**batch, use_cache=False).logits[0].float().cpu()


def model_rows(ctx: Ctx) -> tuple[list[list], list[str], list[str], dict]:
    """(rows, problems, notes, data) for fp32 and bf16, train and eval mode."""
    import torch

    from h1tune import ssm
    from h1tune.data.packing import collate_packed

    ssm.install()  # as every h1tune run has it: on CUDA its dispatcher hands seq_idx to the real kernels
    lengths, chunk = LENGTHS[ctx.device]
    docs = _documents(lengths)
    batch = collate_packed(docs)
    packed_in = {k: batch[k] for k in ("input_ids", "position_ids", "seq_idx")}
    leaky_in = {k: batch[k] for k in ("input_ids", "position_ids")}
    rows, problems, data = [], [], {}
    for dtype in ("float32", "bfloat16"):
        model = leaky_model(chunk, **MIXER[ctx.device]).to(device=ctx.device, dtype=getattr(torch, dtype))
        for mode, train in (("train", True), ("eval", False)):
            alone = torch.cat([_logits(model, ctx.device, train, input_ids=torch.tensor([d["input_ids"]]))
                               for d in docs])
            packed = _logits(model, ctx.device, train, **packed_in)
            exact = rel_err(packed, alone)
            first = lengths[0]  # nothing precedes the first document: its error is the dtype's noise floor
            floor = rel_err(packed[:first], alone[:first]) * float(alone[:first].abs().max()) / float(alone.abs().max())
            leak = rel_err(_logits(model, ctx.device, train, **leaky_in), alone)
            tol = MODEL_TOL[dtype]
            ok = exact <= tol < leak
            rows.append(["model", f"packed vs alone ({mode})", dtype, exact, tol, leak, "ok" if ok else "FAIL"])
            data[f"{dtype}/{mode}"] = {"rel_err": exact, "first_document_rel_err": floor, "tolerance": tol,
                                       "leak_without_seq_idx": leak}
            if not ok:
                problems.append(f"{dtype} {mode}: packed error {exact:.2e}, leak control {leak:.2e}, tol {tol:.0e}")
    floors = ", ".join(f"{k} {v['first_document_rel_err']:.1e}" for k, v in data.items())
    notes = [f"model: mixer {MIXER[ctx.device] or 'of the tiny preset'}, chunk {chunk}",
             f"model: noise floor (error on the first document, which nothing precedes): {floors}",
             f"model: {len(docs)} documents ({'+'.join(map(str, lengths))} = {sum(lengths)} tokens) in one "
             f"row, mamba_chunk_size {chunk}; 'alone' = each document in its own forward"]
    return rows, problems, notes, data


def run(ctx: Ctx) -> StepResult:
    from gpu_steps import kernel_match

    rows, problems, notes, model_data = model_rows(ctx)
    k_rows, k_problems, k_notes, k_data = kernel_match.kernel_rows(ctx)
    problems += k_problems
    notes += k_notes + [f"PROBLEM: {p}" for p in problems]
    model_ok = sum(1 for r in rows if r[-1] == "ok")
    kernel_ok = sum(1 for r in k_rows if r[-1] == "ok")
    summary = (f"model packed==alone {model_ok}/{len(rows)} within tolerance (leak controls all above it); "
               f"kernels {kernel_ok}/{len(k_rows)} match their reference")
    columns = ["level", "comparison", "dtype", "rel err", "tolerance", "leak w/o seq_idx", "verdict"]
    return StepResult(not problems and model_ok == len(rows) and kernel_ok == len(k_rows), summary, columns,
                      rows + k_rows, {"model": model_data, "kernels": k_data}, notes)
