"""Ulysses sequence parallelism (DeepSpeed-Ulysses), applied to a built decoder from outside.

Each rank of the `sp` group holds T/sp tokens of the packed row through every
decoder block. Around attention, an all-to-all trades the token shard for a
head shard, (T/sp, H, D) -> (T, H/sp, D), so each rank runs ordinary packed
attention over the *whole* row for its heads (packed variable-length
sequences included: the kernel sees the global cumulative lengths), and a
second all-to-all trades back. Heads must divide by sp.

Gradients: the decoder input is sliced on the way in (backward: all-gather
the slices' gradients, so every rank holds the full input gradient) and the
output all-gathered on the way out (backward: keep the local slice; every sp
rank computes the same loss from the same gathered output). Parameters
inside the sharded region (the blocks and the final norm) see only their
rank's tokens, so their gradients are summed over the sp group by hooks.
Pooling for the contrastive objective happens on the gathered output, so it
is identical on every rank of the group.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn as nn

from mmpretrain.packing import Packing
from mmpretrain.parallel.collectives import GatherOut, SliceIn, all_to_all


class UlyssesAttention(nn.Module):
    """Wraps a PackedAttention: (T/sp, H, D) local tokens -> all heads' attention over the full row."""

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner, self.group = inner, group

    def forward(self, q, k, v, packing: Packing) -> torch.Tensor:
        q, k, v = (all_to_all(t, scatter_dim=1, gather_dim=0, group=self.group) for t in (q, k, v))
        out = self.inner(q, k, v, packing)  # (T, H/sp, D) over the whole packed row
        return all_to_all(out, scatter_dim=0, gather_dim=1, group=self.group)


def apply_ulysses(decoder: nn.Module, group, sum_grads: bool = True) -> nn.Module:
    """Shard `decoder` (a `Decoder`) over the tokens of its packed input across `group`.
    `sum_grads`: sum the sharded region's gradients over `group` here (False when FSDP2's
    reduce-scatter does it)."""
    sp = dist.get_world_size(group)
    if decoder.cfg.heads % sp:
        raise ValueError(f"parallel.sp={sp} must divide model.decoder.heads={decoder.cfg.heads}")
    for block in decoder.blocks:
        block.attention = UlyssesAttention(block.attention, group)
    for p in list(decoder.blocks.parameters()) + list(decoder.norm.parameters()) if sum_grads else []:
        p.register_hook(lambda g: _sum_over(g, group))

    tokens = 0  # of the row in this forward, before padding: what the output is cut back to

    def shard_input(module, args):
        nonlocal tokens
        x, packing = args
        tokens = len(x)
        pad = (-len(x)) % sp  # a padding sequence of its own, so it attends to nothing real
        if pad:
            x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
            packing = Packing.from_lengths(packing.lengths.tolist() + [pad], device=x.device)
        rank = dist.get_rank(group)
        local = dataclasses.replace(packing, positions=packing.positions.chunk(sp)[rank])
        return SliceIn.apply(x, group), local

    def gather_output(module, args, out):
        return GatherOut.apply(out, group)[:tokens]

    decoder.register_forward_pre_hook(shard_input)
    decoder.register_forward_hook(gather_output)
    return decoder


def _sum_over(grad: torch.Tensor, group) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad, group=group)
    return grad
