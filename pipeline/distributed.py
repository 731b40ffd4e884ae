"""The one place that knows about process groups: rank/world queries and feature gathering.

Everything else asks these helpers instead of reading `RANK`/`WORLD_SIZE` from the environment, so the
same code runs in a single process, under torchrun, under DeepSpeed and inside Ray Train workers.
"""

from __future__ import annotations

import os
from datetime import timedelta

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


def launcher_rank() -> int:
    """This process's rank as its launcher assigned it, before any process group exists (torchrun's RANK; 0 for a
    plain process and for a Ray driver): which process of a launch takes run-level resources such as the run lock."""
    return get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def ensure_process_group(backend: str) -> None:
    """Join the launcher's process group, or make a one-process group when started without one.

    DeepSpeed needs a process group even for one process. torchrun and Ray Train set the rendezvous
    variables (Ray even creates the group). A plain `python job.py` gets an in-memory store: no TCP port,
    so nothing can race for one, and nothing is left in the environment for a later stage in the same
    process (a recipe) or for child processes to mistake for a launcher's rendezvous.
    """
    if is_distributed():
        return
    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend=backend)
        return
    os.environ.setdefault("LOCAL_RANK", "0")
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)


def set_collective_timeout(seconds: float) -> int:
    """Give every process group of this process a collective timeout of `seconds`; returns how many groups.

    Every group, not only the default one: DeepSpeed runs its reductions on groups of its own (a clone of the
    world group for data parallelism). A rank that then waits longer than `seconds` in a collective fails: NCCL's
    watchdog ends the process, gloo raises. So a hung or stalled rank stops the group in minutes, and Ray restarts
    it from the last checkpoint, instead of every rank waiting out the launcher's timeout (Ray's TorchConfig: 30
    minutes). torchtitan shortens its timeouts the same way once the first step is done.
    """
    if not is_distributed():
        return 0
    from torch.distributed import distributed_c10d as c10d

    # torch has no public list of a process's groups; c10d's registry is what destroy_process_group walks.
    groups = [pg for pg in c10d._world.pg_map if not c10d._rank_not_in_group(pg)]
    # The public name is newer than the private one (torchtitan's), which older torch releases have only.
    set_timeout = getattr(dist, "set_timeout", None) or c10d._set_pg_timeout
    for group in groups:
        set_timeout(timedelta(seconds=seconds), group)
    return len(groups)


def local_rank() -> int:
    """Device index of this process on its node (LOCAL_RANK from torchrun / Ray Train, else 0)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    if is_distributed():
        dist.barrier()


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns this rank's slice of the gradient: summed over every rank's loss first
    (`sum_gradients`), or this rank's own loss's alone (the released UMT `AllGather`)."""

    @staticmethod
    def forward(ctx, x_BD: Tensor, sum_gradients: bool) -> Tensor:
        gathered = [torch.empty_like(x_BD) for _ in range(get_world_size())]
        dist.all_gather(gathered, x_BD.contiguous())
        ctx.batch, ctx.sum_gradients = x_BD.shape[0], sum_gradients
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx, grad_WBD: Tensor) -> tuple[Tensor, None]:
        if ctx.sum_gradients:
            # Every rank's loss touches every rank's features (as negatives), so the gradient of a slice is
            # the sum over ranks: one all-reduce, then keep our own rows.
            grad_WBD = grad_WBD.contiguous()
            dist.all_reduce(grad_WBD, op=dist.ReduceOp.SUM)
        start = get_rank() * ctx.batch
        return grad_WBD[start : start + ctx.batch], None


def all_gather_with_grad(x_BD: Tensor, sum_gradients: bool = True) -> Tensor:
    """Concatenate `x_BD` from every rank along dim 0, differentiably. All ranks must pass the same shape.

    `sum_gradients` (exact): the backward sums the contributions of all ranks' losses to each rank's slice, so a
    loss computed on the gathered batch gives the same gradients as one process holding the whole batch (with
    the usual 1/world averaging of data-parallel gradient reduction in mind). False: each slice gets only this
    rank's own loss's gradient, as the released UMT / VideoMamba video-text code gathers; after data-parallel
    averaging the gradient reaching the features is then 1/world of the whole-batch one.
    """
    if get_world_size() == 1:
        return x_BD
    return _AllGatherWithGrad.apply(x_BD, sum_gradients)


def all_reduce_mean(value: Tensor) -> Tensor:
    """Mean of a tensor over ranks (for logging; not differentiable)."""
    if not is_distributed():
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / get_world_size()


def all_reduce_sum(value: Tensor) -> Tensor:
    """Sum of a tensor over ranks (counts of an evaluation; not differentiable)."""
    if not is_distributed():
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_uneven(x_N: Tensor) -> Tensor:
    """Concatenate `x_N` from every rank along dim 0 when ranks hold different row counts (not differentiable).

    Rows are padded to the largest count for the collective and trimmed after; trailing dims and dtype
    must agree across ranks. Used to assemble evaluation features that each rank computed for its slice.
    """
    if get_world_size() == 1:
        return x_N
    count = torch.tensor([x_N.shape[0]], device=x_N.device)
    counts = [torch.zeros_like(count) for _ in range(get_world_size())]
    dist.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    padded = x_N.new_zeros((max(counts), *x_N.shape[1:]))
    padded[: x_N.shape[0]] = x_N
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, counts, strict=True)])


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank `src`'s picklable `obj` on every rank (identity in a single process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: object) -> list[object]:
    """Every rank's picklable `obj`, in rank order, on every rank (`[obj]` in a single process)."""
    if not is_distributed():
        return [obj]
    gathered: list[object] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
