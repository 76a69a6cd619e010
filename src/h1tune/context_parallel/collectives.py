"""Autograd-aware all-gather for context parallelism, built on collectives gloo has.

Each rank of a context-parallel (CP) group holds one slice of a row; a rank that reads another
rank's tensor (keys and values, a carried SSM state, a conv halo) reads it through `all_gather`.
The gradient of what rank j contributed is the sum, over every rank, of that rank's gradient for
slot j of the gathered stack: an `all_reduce` of the stacked gradients, of which each rank keeps
its own slot. gloo has no reduce_scatter or all_to_all, and send/recv pairs would need every
rank to know who reads what; an all_reduce needs neither.

Every rank must run the same collectives in the same order, in forward and in backward. The
callers keep that by building the same graph on every rank: the gathered stack is always used
whole (a rank that needs nothing from it, rank 0 for a carried state, still indexes the stack),
so each rank's backward reaches every gather's backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllGather(torch.autograd.Function):
    """(…) -> (world, …) in forward; in backward the summed gradient of this rank's slot."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor, group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()  # all_reduce writes in place; autograd may still hold grad
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank], None


def all_gather(tensor: torch.Tensor, group) -> torch.Tensor:
    """Every rank's `tensor`, stacked in rank order (world, *tensor.shape); differentiable.

    All ranks must pass tensors of one shape and dtype. Gradients of the stack flow back to the
    rank that contributed each slot, summed over the ranks that read it.
    """
    if not tensor.requires_grad:
        return _gather_values(tensor, group)
    return _AllGather.apply(tensor, group)


@torch.no_grad()
def _gather_values(tensor: torch.Tensor, group) -> torch.Tensor:
    """The forward of `all_gather` without a backward (integer ids, frozen inputs)."""
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor, group=group)
    return torch.stack(parts)


def rank_and_size(group) -> tuple[int, int]:
    """This process's rank within `group` and the group's size."""
    return dist.get_rank(group), dist.get_world_size(group)
