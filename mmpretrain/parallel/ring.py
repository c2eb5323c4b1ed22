"""Ring attention (context parallelism) over packed rows of variable-length documents.

The `cp` ranks of a ring each hold a slice of the packed row's tokens; key/value blocks travel the
ring (each step a rank sends its current block to the next rank and receives the previous rank's),
so after cp - 1 steps every query has met every key once, and no rank ever holds more than two
blocks: a rank's memory is O(T / cp), whatever the row's length. Each block's contribution is
merged into the running output by its log-sum-exp (the online softmax of flash attention), in fp32.

The document mask comes from the tokens' places in the whole row (`RingLayout`): query i attends
key j when both lie in the same packed sequence and j <= i, so no token attends across
documents, and a document may span any number of ranks (longer than a slice, or of one token).
Load balance: the row (padded internally to a multiple of 2 x cp x ulysses) is cut into 2 x cp
chunks and ring rank r holds chunks r and 2cp - 1 - r (zig-zag), so every rank holds as many early
tokens (little causal work) as late ones, for any document lengths.

Backward: the blocks travel the ring again, each with its key/value gradient accumulating as it
goes, and after cp steps every block (and its gradient) is home; the attention probabilities are
recomputed per block from the saved log-sum-exp instead of kept.

Inside Ulysses (USP, `parallel.sp` x `parallel.cp`): an all-to-all within each Ulysses group
first trades heads for tokens, so the ring runs over the ring rank's whole slice with H / sp heads;
the sequence-parallel degree is sp x cp, no longer capped by the head count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mmpretrain.parallel.collectives import all_to_all, start_exchange


@dataclass
class RingLayout:
    """Where the tokens of each ring rank sit in the padded packed row."""

    index: torch.Tensor  # (cp, n): the row positions held by ring rank r, in their order there
    doc: torch.Tensor  # (T,): the packed sequence of each token of the padded row


def zigzag(total: int, cp: int) -> torch.Tensor:
    """The row order in which the ranks hold tokens: chunks r and 2cp-1-r of 2cp for ring rank r,
    rank after rank. `total` divides by 2 x cp."""
    chunks = torch.arange(total).chunk(2 * cp)
    return torch.cat([torch.cat([chunks[r], chunks[2 * cp - 1 - r]]) for r in range(cp)])


def _allowed(qi: torch.Tensor, ki: torch.Tensor, doc: torch.Tensor) -> torch.Tensor:
    """(Tq, Tk): same document and causal, from the tokens' row positions."""
    return (doc[qi][:, None] == doc[ki][None, :]) & (ki[None, :] <= qi[:, None])


def _scores(q, k, allowed, scale):
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    return s.masked_fill(~allowed, float("-inf"))


# queries per piece of a block's computation: the (H, QUERY_CHUNK, block) scores are the largest
# temporary, so a rank's memory stays O(T / cp) for any row length
QUERY_CHUNK = 1024


def _pieces(qi: torch.Tensor, ki: torch.Tensor, doc: torch.Tensor):
    """(query slice, mask) for each QUERY_CHUNK of this rank's queries that meets a key of the block."""
    for a in range(0, len(qi), QUERY_CHUNK):
        rows = slice(a, a + QUERY_CHUNK)
        allowed = _allowed(qi[rows], ki, doc)
        if allowed.any():
            yield rows, allowed


def _merge_block(q, kb, vb, pieces, out, lse, scale) -> None:
    """Fold one key/value block into the running (out, lse), in place (online softmax)."""
    for rows, allowed in pieces:
        s = _scores(q[rows], kb, allowed, scale)
        block_lse = s.logsumexp(-1)
        new = torch.logaddexp(lse[:, rows], block_lse)
        keep = torch.where(torch.isinf(new), 0.0, torch.exp(lse[:, rows] - new))  # rows with nothing yet
        p = torch.where(torch.isinf(block_lse)[..., None], 0.0, torch.exp(s - new[..., None]))
        out[rows] = out[rows] * keep.t()[..., None] + torch.einsum("hqk,khd->qhd", p, vb.float())
        lse[:, rows] = new


def _block_grads(q, kb, vb, pieces, dout, lse, delta, dq, dk, dv, scale) -> None:
    """One block's share of dq (in place) and of its own dk, dv (in place), the probabilities
    recomputed from the final log-sum-exp."""
    for rows, allowed in pieces:
        p = torch.exp(_scores(q[rows], kb, allowed, scale) - lse[:, rows, None])  # 0 where masked
        dv += torch.einsum("hqk,qhd->khd", p, dout[rows])
        ds = p * (torch.einsum("qhd,khd->hqk", dout[rows], vb.float()) - delta[:, rows, None])
        dq[rows] += torch.einsum("hqk,khd->qhd", ds, kb.float()) * scale
        dk += torch.einsum("hqk,qhd->khd", ds, q[rows].float()) * scale


def _send_next(tensors: list[torch.Tensor], group) -> tuple[list[torch.Tensor], list]:
    """Start sending `tensors` to the next ring rank and receiving the previous one's -> (buffers,
    works to wait on): in flight while this rank computes."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    bufs = [torch.empty_like(t) for t in tensors]
    works = start_exchange([(t, (rank + 1) % world) for t in tensors], [(b, (rank - 1) % world) for b in bufs], group)
    return bufs, works


def _arrived(pending) -> list[torch.Tensor]:
    bufs, works = pending
    for w in works:
        w.wait()
    return bufs


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout: RingLayout, group):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        scale = 1 / math.sqrt(q.shape[-1])
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device)  # (H, Tq)
        qi, block, src = layout.index[rank], [k, v], rank
        for step in range(world):
            pending = _send_next(block, group) if step < world - 1 else None
            _merge_block(q, *block, _pieces(qi, layout.index[src], layout.doc), out, lse, scale)
            if pending is not None:
                block, src = _arrived(pending), (src - 1) % world
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.group = layout, group
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        layout, group = ctx.layout, ctx.group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        scale = 1 / math.sqrt(q.shape[-1])
        dout = dout.float()
        delta = (dout * out).sum(-1).t()  # (H, Tq)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        qi, src = layout.index[rank], rank
        block = [k, v, torch.zeros(k.shape, dtype=torch.float32, device=k.device),
                 torch.zeros(v.shape, dtype=torch.float32, device=v.device)]
        for _ in range(world):  # world sends: each block, with its gradient, ends where it began
            kb, vb, dk, dv = block
            _block_grads(q, kb, vb, _pieces(qi, layout.index[src], layout.doc), dout, lse, delta, dq, dk, dv, scale)
            block, src = _arrived(_send_next(block, group)), (src - 1) % world
        return dq.to(q.dtype), block[2].to(k.dtype), block[3].to(v.dtype), None, None


def ring_attention(q, k, v, layout: RingLayout, group) -> torch.Tensor:
    """Causal attention within each packed document of the whole row, for this ring rank's tokens.
    q, k, v: (n, H, D), the rank's tokens in `layout.index[rank]` order -> (n, H, D)."""
    return _RingAttention.apply(q, k, v, layout, group)


class RingAttentionModule(torch.nn.Module):
    """In place of a decoder block's PackedAttention under context parallelism: the local
    tokens' q, k, v -> their attention over the whole row (Ulysses' all-to-all around it when
    `ulysses_group` has more than one rank). The row's `RingLayout` rides on the packing."""

    def __init__(self, inner: torch.nn.Module, ring_group, ulysses_group=None):
        super().__init__()
        self.inner, self.ring_group, self.ulysses_group = inner, ring_group, ulysses_group

    def forward(self, q, k, v, packing) -> torch.Tensor:
        uly = self.ulysses_group
        if uly is not None:
            q, k, v = (all_to_all(t, scatter_dim=1, gather_dim=0, group=uly) for t in (q, k, v))
        out = ring_attention(q, k, v, packing.ring, self.ring_group)
        if uly is not None:
            out = all_to_all(out, scatter_dim=0, gather_dim=1, group=uly)
        return out
