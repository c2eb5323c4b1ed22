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

With `parallel.cp` the same sharding carries ring attention (parallel/ring.py) instead of,
or inside, the all-to-all: the row is laid out zig-zag over the ring first.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn as nn

from mmpretrain.packing import Packing
from mmpretrain.parallel.collectives import GatherOut, SliceIn, all_to_all
from mmpretrain.parallel.ring import RingAttentionModule, RingLayout, zigzag


class UlyssesAttention(nn.Module):
    """Wraps a PackedAttention: (T/sp, H, D) local tokens -> all heads' attention over the full row."""

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner, self.group = inner, group

    def forward(self, q, k, v, packing: Packing) -> torch.Tensor:
        q, k, v = (all_to_all(t, scatter_dim=1, gather_dim=0, group=self.group) for t in (q, k, v))
        out = self.inner(q, k, v, packing)  # (T, H/sp, D) over the whole packed row
        return all_to_all(out, scatter_dim=0, gather_dim=1, group=self.group)


def apply_ulysses(decoder: nn.Module, group, sum_grads: bool = True, ring_group=None, ulysses_group=None) -> nn.Module:
    """Shard `decoder` (a `Decoder`) over the tokens of its packed input across `group`.
    `sum_grads`: sum the sharded region's gradients over `group` here (False when FSDP2's
    reduce-scatter does it). `ring_group` (context parallelism, parallel/ring.py): attention by
    ring over that group's ranks, inside Ulysses over `ulysses_group` (None: none); `group` is then
    their product (ring rank major), and the row is laid out zig-zag over the ring."""
    world = dist.get_world_size(group)
    cp = dist.get_world_size(ring_group) if ring_group is not None else 1
    uly = world // cp
    if decoder.cfg.heads % uly:
        raise ValueError(f"parallel.sp={uly} must divide model.decoder.heads={decoder.cfg.heads}")
    for block in decoder.blocks:
        block.attention = UlyssesAttention(block.attention, group) if cp == 1 else \
            RingAttentionModule(block.attention, ring_group, ulysses_group)
    for p in list(decoder.blocks.parameters()) + list(decoder.norm.parameters()) if sum_grads else []:
        p.register_hook(lambda g: _sum_over(g, group))

    tokens, order = 0, None  # of the row in this forward, before padding; its zig-zag order (cp > 1)

    def shard_input(module, args):
        nonlocal tokens, order
        x, packing = args
        tokens = len(x)
        pad = (-len(x)) % (world * (2 if cp > 1 else 1))  # a padding sequence of its own, so it
        if pad:  # attends to nothing real
            x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
            packing = Packing.from_lengths(packing.lengths.tolist() + [pad], device=x.device)
        rank = dist.get_rank(group)
        positions, ring = packing.positions, None
        if cp > 1:
            order = zigzag(len(x), cp).to(x.device)
            x, positions = x[order], positions[order]
            doc = torch.repeat_interleave(torch.arange(packing.num_seqs, device=x.device), packing.lengths)
            ring = RingLayout(order.view(cp, -1), doc)
        local = dataclasses.replace(packing, positions=positions.chunk(world)[rank], ring=ring)
        return SliceIn.apply(x, group), local

    def gather_output(module, args, out):
        out = GatherOut.apply(out, group)
        if order is not None:
            out = out[torch.argsort(order)]
        return out[:tokens]

    decoder.register_forward_pre_hook(shard_input)
    decoder.register_forward_hook(gather_output)
    return decoder


def _sum_over(grad: torch.Tensor, group) -> torch.Tensor:
    grad = grad.clone()
    # a tensor-parallel DTensor's own shard: the sp peers hold the same shard of other tokens
    dist.all_reduce(grad.to_local() if hasattr(grad, "to_local") else grad, group=group)
    return grad
