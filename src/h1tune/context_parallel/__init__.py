"""Context parallelism (CP) for Falcon-H1: one long packed row split across the ranks of a group.

    from h1tune import context_parallel as cp
    mine = cp.split_packed_batch(batch, num_slices=cp_size)[cp_rank]   # batch: collate_packed rows
    with cp.enabled(cp_group, model=model):                            # forward AND backward inside
        logits = model(input_ids=mine["input_ids"], position_ids=mine["position_ids"],
                       seq_idx=mine["seq_idx"], use_cache=False).logits
        loss = cp.token_loss(logits, mine["shift_labels"], mine["num_items_in_batch"])
        loss.backward()
    # then SUM gradients over the CP group (all_reduce SUM); the all_reduce SUM of `loss` is the row's.
    # DDP averages instead: backward loss * cp_size (DDP over cp ranks, or over dp x cp ranks for a mean
    # over rows), or count num_items_in_batch over all dp rows and backward loss * world_size (token
    # mean). Give CP its own dist.new_group, so its collectives never interleave with DDP's buckets.

Each rank runs the whole model on its contiguous slice; the ranks exchange what crosses a slice
boundary: attention keys/values (`attention.py`), the Mamba conv halo and the carried SSM state
(`mamba.py`), all through an autograd-aware all-gather that works on gloo (`collectives.py`).
Loss and summed gradients equal one process running the whole row (fp32: the loss to the last bit,
each gradient to ~3e-6 of its largest entry in tests/integration/test_context_parallel.py).
`split.py` cuts the row (global segment ids, pre-shifted labels, a padding document); `loss.py`
scores a slice; `context.py` routes transformers' calls while a block is active.
"""

from h1tune.context_parallel.collectives import all_gather
from h1tune.context_parallel.context import enabled, is_enabled
from h1tune.context_parallel.loss import token_loss
from h1tune.context_parallel.split import pad_to_multiple, shift_labels, split_packed_batch

__all__ = ["all_gather", "enabled", "is_enabled", "pad_to_multiple", "shift_labels", "split_packed_batch",
           "token_loss"]
