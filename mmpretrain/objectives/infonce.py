"""Symmetric InfoNCE (CLIP's loss) over the global batch, its rows gathered with gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over matching rows of (N, E) normalised features (open_clip's ClipLoss)."""
    logits = logit_scale * a @ b.t()
    labels = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def gather_with_grad(rows: dict[str, torch.Tensor], group) -> dict[str, torch.Tensor]:
    """Every rank of `group`'s rows of each tensor (all with this rank's row count), keeping
    gradients for the local ones (open_clip's gather). `group` None: this process alone.

    Ranks may hold different numbers of rows (token-budget batches): rows are padded to the
    largest count for the collective and the padding is dropped again."""
    if group is None:
        return rows
    from mmpretrain.parallel.collectives import all_gather

    n = len(next(iter(rows.values())))
    counts = all_gather(torch.tensor(n, device=next(iter(rows.values())).device), group).tolist()
    out = {}
    for name, x in rows.items():
        parts = all_gather(torch.cat([x, x.new_zeros(max(counts) - n, *x.shape[1:])]), group)
        out[name] = torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0)
    return out
