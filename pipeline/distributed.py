"""The one place that knows about process groups: rank/world queries and feature gathering.

Everything else asks these helpers instead of reading `RANK`/`WORLD_SIZE` from the environment, so the
same code runs in a single process, under torchrun, under DeepSpeed and inside Ray Train workers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for each slice and returns the local one."""

    @staticmethod
    def forward(ctx, x_BD: Tensor) -> Tensor:
        gathered = [torch.empty_like(x_BD) for _ in range(get_world_size())]
        dist.all_gather(gathered, x_BD.contiguous())
        ctx.batch = x_BD.shape[0]
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx, grad_WBD: Tensor) -> Tensor:
        # Every rank's loss touches every rank's features (as negatives), so the gradient of a slice is
        # the sum over ranks: one all-reduce, then keep our own rows.
        grad_WBD = grad_WBD.contiguous()
        dist.all_reduce(grad_WBD, op=dist.ReduceOp.SUM)
        start = get_rank() * ctx.batch
        return grad_WBD[start : start + ctx.batch]


def all_gather_with_grad(x_BD: Tensor) -> Tensor:
    """Concatenate `x_BD` from every rank along dim 0, differentiably.

    Gradients are exact: the backward sums the contributions of all ranks' losses to each rank's slice,
    so a loss computed on the gathered batch gives the same gradients as one process holding the whole
    batch (with the usual 1/world averaging of data-parallel gradient reduction in mind). All ranks must
    pass the same shape.
    """
    if get_world_size() == 1:
        return x_BD
    return _AllGatherWithGrad.apply(x_BD)


def all_reduce_mean(value: Tensor) -> Tensor:
    """Mean of a tensor over ranks (for logging; not differentiable)."""
    if not is_distributed():
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / get_world_size()
