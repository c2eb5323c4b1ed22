"""SigLIP: the sigmoid loss over every (a, b) pair of the global batch, in memory that does not
grow with the number of ranks.

    L = -1/N * sum_ij log sigmoid(z_ij * (t * a_i . b_j + bias)),  z_ij = +1 for a pair, -1 otherwise

over the N samples of the data-parallel group with both sides (Zhai et al. 2023; open_clip's
`SigLipLoss`). Rank r computes its own rows i against every rank's b, block by block: its own b
(the diagonal block, its positives) and the other ranks' b, which arrive either by a
bidirectional neighbour ring (P2P: a block travels one rank left and one right per step, as
open_clip's `bidir` mode) or by one all-gather. No block's logits are kept for the backward
pass: `_SigLip.backward` runs the same exchange again, recomputes each block's logits `chunk`
columns at a time, and sends each b block's gradient back to the rank that owns it (in ring mode
the gradient travels with its block, then goes home in one P2P step). A rank's peak memory is
O(local batch x chunk) for logits, and in ring mode O(local batch x embedding) for what travels,
whatever the world size; gather mode holds the global batch's embeddings (O(N x embedding)).

Open_clip's distributed SigLIP keeps every block's logits and the received features for autograd
(its memory grows with the world size at a fixed per-rank batch: open_clip #942); this is why
the exchange is an autograd Function of its own here rather than differentiable collectives.

Rank r's loss is W/N times its rows' share of the sum (W ranks), so that the ranks' mean is L and
the data-parallel average of the gradients is L's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmpretrain.parallel.collectives import start_exchange

MODES = ("ring", "gather")


def _pairs_sum(a, b_cols, scale, bias, offset: int | None) -> torch.Tensor:
    """-sum log sigmoid(z * (scale a.b + bias)) over a x b_cols, in fp32; z = +1 at (i, i - offset)
    (`offset`: the columns' first index in a diagonal block; None: no positives), else -1."""
    logits = (scale * a @ b_cols.t() + bias).float()
    z = -torch.ones_like(logits)
    if offset is not None:
        rows = torch.arange(offset, offset + len(b_cols), device=a.device)
        rows = rows[rows < len(a)]
        z[rows, rows - offset] = 1.0
    return -F.logsigmoid(z * logits).sum()


def _chunks(b: torch.Tensor, chunk: int):
    step = chunk or max(len(b), 1)
    return range(0, len(b), step), step


def _block_sum(a, b, scale, bias, diagonal: bool, chunk: int) -> torch.Tensor:
    """_pairs_sum over the (len(a), len(b)) block, `chunk` columns at a time (0: all); positives on
    the diagonal when `diagonal` (a[i] and b[i] are a pair)."""
    starts, step = _chunks(b, chunk)
    return sum((_pairs_sum(a, b[j : j + step], scale, bias, j if diagonal else None) for j in starts),
               a.new_zeros((), dtype=torch.float32))


def _block_grads(a, b, scale, bias, diagonal: bool, chunk: int):
    """_block_sum's gradients for (a, b, scale, bias), the logits recomputed `chunk` columns at a
    time and freed after each."""
    ga, gb, gs, gbias = torch.zeros_like(a), torch.zeros_like(b), torch.zeros_like(scale), torch.zeros_like(bias)
    starts, step = _chunks(b, chunk)
    for j in starts:
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (a, b[j : j + step], scale, bias)]
            part = _pairs_sum(*leaves, j if diagonal else None)
            da, db, ds, dbias = torch.autograd.grad(part, leaves)
        ga += da
        gb[j : j + step] += db
        gs += ds
        gbias += dbias
    return ga, gb, gs, gbias


def _exchange(sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]], group) -> None:
    """Point-to-point sends and receives (group ranks), all in flight at once, waited for."""
    for work in start_exchange(sends, recvs, group):
        work.wait()


class _SigLip(torch.autograd.Function):
    """Rank r's W/N-scaled share of the SigLIP sum: its rows `a` against every rank's `b`."""

    @staticmethod
    def forward(ctx, a, b, scale, bias, group, mode: str, chunk: int, counts: list[int]):
        ctx.save_for_backward(a, b, scale, bias)
        ctx.group, ctx.mode, ctx.chunk, ctx.counts = group, mode, chunk, counts
        world = len(counts)
        total = _block_sum(a, b, scale, bias, True, chunk)
        if world > 1:
            for other, _ in _others(b, counts, group, mode):
                total = total + _block_sum(a, other, scale, bias, False, chunk)
        return total * (world / sum(counts))

    @staticmethod
    def backward(ctx, grad):
        a, b, scale, bias = ctx.saved_tensors
        group, mode, chunk, counts = ctx.group, ctx.mode, ctx.chunk, ctx.counts
        world = len(counts)
        ga, gb, gs, gbias = _block_grads(a, b, scale, bias, True, chunk)
        if world > 1:
            if mode == "gather":
                gb = gb + _gather_backward(a, b, scale, bias, group, chunk, counts, (ga, gs, gbias))
            else:
                gb = gb + _ring_backward(a, b, scale, bias, group, chunk, counts, (ga, gs, gbias))
        w = grad * (world / sum(counts))
        return ga * w, gb * w, gs * w, gbias * w, None, None, None, None


def _padded(x: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([x, x.new_zeros(n - len(x), *x.shape[1:])]) if len(x) < n else x


def _others(b, counts, group, mode):
    """Every other rank's b block, trimmed to its count: (block, its rank)."""
    rank, world, n = dist.get_rank(group), len(counts), max(counts)
    if mode == "gather":
        parts = [torch.empty(n, *b.shape[1:], dtype=b.dtype, device=b.device) for _ in range(world)]
        dist.all_gather(parts, _padded(b, n).contiguous(), group=group)
        for src in range(world):
            if src != rank:
                yield parts[src][: counts[src]], src
        return
    for block, src, _ in _ring(_padded(b, n), group):
        yield block[: counts[src]], src


def _ring(x: torch.Tensor, group):
    """The bidirectional ring's stops: each rank's `x` travels one rank right and one left a step
    until every other rank's has arrived once (at distance world / 2, an even world's last step,
    from one side only). Yields (what arrived, the rank it started at, "right" or "left"); what the
    caller adds to an arrived tensor in place travels on with it."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    right = left = x  # right: travels to rank + 1 each step; left: to rank - 1
    for s in range(1, world // 2 + 1):
        two_way = s <= (world - 1) // 2
        new_right = torch.empty_like(right)
        sends, recvs = [(right, (rank + 1) % world)], [(new_right, (rank - 1) % world)]
        if two_way:
            new_left = torch.empty_like(left)
            sends.append((left, (rank - 1) % world))
            recvs.append((new_left, (rank + 1) % world))
        _exchange(sends, recvs, group)
        right = new_right
        yield right, (rank - s) % world, "right"
        if two_way:
            left = new_left
            yield left, (rank + s) % world, "left"


def _gather_backward(a, b, scale, bias, group, chunk, counts, sums) -> torch.Tensor:
    """Gather mode: every block's gradients recomputed here; each b block's gradient summed over
    the ranks (all-reduce of all of them) -> this rank's b gradient from the other ranks' rows."""
    ga, gs, gbias = sums
    rank, world, n = dist.get_rank(group), len(counts), max(counts)
    g_all = torch.zeros(world, n, *b.shape[1:], dtype=b.dtype, device=b.device)
    for other, src in _others(b, counts, group, "gather"):
        da, db, ds, dbias = _block_grads(a, other, scale, bias, False, chunk)
        ga += da
        gs += ds
        gbias += dbias
        g_all[src, : counts[src]] = db
    dist.all_reduce(g_all, group=group)  # gloo has no reduce-scatter
    return g_all[rank, : counts[rank]]


def _ring_backward(a, b, scale, bias, group, chunk, counts, sums) -> torch.Tensor:
    """Ring mode: the blocks travel again, each with its gradient so far (one tensor: block and
    gradient side by side), gaining this rank's rows' share at every stop; at the end each
    gradient goes back to its block's rank in one P2P step per direction."""
    ga, gs, gbias = sums
    rank, world, n, e = dist.get_rank(group), len(counts), max(counts), b.shape[1]
    held = {}  # direction -> (the block and gradient it brought last, that block's rank)
    for travelling, src, way in _ring(torch.cat([_padded(b, n), torch.zeros_like(_padded(b, n))], dim=1), group):
        c = counts[src]
        da, db, ds, dbias = _block_grads(a, travelling[:c, :e], scale, bias, False, chunk)
        ga += da
        gs += ds
        gbias += dbias
        travelling[:c, e:] += db
        held[way] = travelling, src
    # home: each direction's last block's gradient goes to its rank; this rank's own block went as
    # far the other way, and its gradient comes back from there
    sends, recvs = [], []
    for travelling, src in held.values():
        sends.append((travelling[:, e:].contiguous(), src))
        recvs.append((torch.empty(n, e, dtype=b.dtype, device=b.device), (2 * rank - src) % world))
    _exchange(sends, recvs, group)
    return sum(got for got, _ in recvs)[: counts[rank]]


def siglip_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, group=None,
                mode: str = "ring", chunk: int = 0) -> torch.Tensor | None:
    """This rank's share of the SigLIP loss of matching rows of (n, E) normalised `a` and `b`
    over the data-parallel `group` (None: this process alone, the loss itself); `scale` = exp(logit
    scale) and `bias` of shape (1,); `mode` ring or gather; `chunk` logit columns at a time (0: a
    rank's whole block). Ranks may hold different row counts. None when no rank holds a row.
    Collective: every rank of `group` calls it, with or without rows."""
    if mode not in MODES:
        raise ValueError(f"SigLIP exchange {mode!r}: one of {MODES}")
    if group is None or dist.get_world_size(group) == 1:
        counts = [len(a)]
    else:
        from mmpretrain.parallel.collectives import gathered

        counts = [int(c) for c in gathered(torch.tensor([len(a)], device=a.device), group)]
    if not sum(counts):
        return None  # no pair on any rank (every rank knows: the counts are gathered)
    with torch.autocast(a.device.type, enabled=False):  # fp32 logits; the backward recomputes them alike
        return _SigLip.apply(a.float(), b.float(), scale.float(), bias.float(), group, mode, chunk, counts)
