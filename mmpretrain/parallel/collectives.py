"""Differentiable collectives over a process group.

Written here rather than taken from torch.distributed.nn.functional: on gloo
that module emulates all-to-all (also the backward of its all_gather) with
scatters whose source is a group rank passed as a global one, which fails in
every subgroup that does not hold those global ranks (any dp x sp mesh).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def gathered(x: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's `x` (same shape on all ranks), in rank order; not differentiable."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts


class _AllToAll(torch.autograd.Function):
    """Chunk j goes to rank j; the backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, group, *chunks):
        ctx.group = group
        out = [torch.empty_like(c) for c in chunks]
        dist.all_to_all(out, [c.contiguous() for c in chunks], group=group)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        return (None, *_AllToAll.apply(ctx.group, *grads))


class _AllGather(torch.autograd.Function):
    """Every rank's tensor, stacked; the backward sums all ranks' gradients for the local one."""

    @staticmethod
    def forward(ctx, group, x):
        ctx.group = group
        return torch.stack(gathered(x, group))

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return None, grad[dist.get_rank(ctx.group)]


class SliceIn(torch.autograd.Function):
    """Forward: this rank's token slice. Backward: every rank's slice gradient, concatenated."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        return x.chunk(world, dim=0)[rank].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return torch.cat(gathered(grad, ctx.group)), None


class GatherOut(torch.autograd.Function):
    """Forward: all ranks' slices, concatenated. Backward: the local slice (same loss on every rank)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return torch.cat(gathered(x, group))

    @staticmethod
    def backward(ctx, grad):
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        return grad.chunk(world, dim=0)[rank].contiguous(), None


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """Split x along scatter_dim across the group's ranks, concatenate what arrives along gather_dim."""
    chunks = x.chunk(dist.get_world_size(group), dim=scatter_dim)
    return torch.cat(_AllToAll.apply(group, *chunks), dim=gather_dim)


def all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """(N, ...) on each rank -> (world, N, ...), differentiable."""
    return _AllGather.apply(group, x)


def start_exchange(sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]], group) -> list:
    """Point-to-point sends and receives (ranks of `group`), all put in flight at once -> the works
    to wait on (the caller may compute meanwhile)."""
    peer = lambda r: dist.get_global_rank(group, r)  # noqa: E731
    ops = [dist.P2POp(dist.isend, t.contiguous(), peer(r), group) for t, r in sends]
    ops += [dist.P2POp(dist.irecv, t, peer(r), group) for t, r in recvs]
    return dist.batch_isend_irecv(ops)
