"""Training objectives: symmetric InfoNCE between modality pairs, and next-token captioning."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmpretrain.config import ObjectivesConfig
from mmpretrain.model import ModelOutput


def clip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over matching rows of (N, E) normalised features (open_clip's ClipLoss)."""
    logits = logit_scale * a @ b.t()
    labels = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def gather_with_grad(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every data-parallel rank's rows of each tensor (all with this rank's row count), keeping
    gradients for the local ones (open_clip's gather).

    Ranks may hold different numbers of rows (token-budget batches): rows are padded to the
    largest count for the collective and the padding is dropped again."""
    from mmpretrain.parallel import data_parallel

    _, size, group = data_parallel()
    if size == 1:
        return rows
    from mmpretrain.parallel.collectives import all_gather

    n = len(next(iter(rows.values())))
    counts = all_gather(torch.tensor(n, device=next(iter(rows.values())).device), group).tolist()
    out = {}
    for name, x in rows.items():
        parts = all_gather(torch.cat([x, x.new_zeros(max(counts) - n, *x.shape[1:])]), group)
        out[name] = torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0)
    return out


def contrastive_losses(out: ModelOutput, logit_scales, max_logit_scale: float) -> dict[str, torch.Tensor]:
    """One loss per pair in `logit_scales` ("text-image", ...), over samples that have both sides."""
    rows = gather_with_grad({**{f"emb/{m}": e for m, e in out.embeddings.items()},
                             **{f"has/{m}": p.float() for m, p in out.present.items()}})
    feats = {m: rows[f"emb/{m}"] for m in out.embeddings}
    present = {m: rows[f"has/{m}"].bool() for m in out.present}
    losses = {}
    for pair, param in logit_scales.items():
        a, b = pair.split("-")
        both = present[a] & present[b]
        if int(both.sum()) < 2:
            continue  # no negatives: nothing to contrast
        scale = param.clamp(max=math.log(max_logit_scale)).exp()
        losses[f"contrastive/{pair}"] = clip_loss(feats[a][both], feats[b][both], scale)
    return losses


def next_token_loss(out: ModelOutput) -> torch.Tensor:
    logits = out.lm_logits  # at least fp32 for the vocabulary-wide softmax under bf16 autocast
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), out.lm_targets)


def total_loss(out: ModelOutput, model, cfg: ObjectivesConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the objectives -> (loss, {term: value}) for logging."""
    terms = contrastive_losses(out, model.logit_scale, cfg.max_logit_scale) if cfg.contrastive_weight else {}
    loss = out.lm_logits.new_zeros(())
    if terms:
        loss = loss + cfg.contrastive_weight * sum(terms.values()) / len(terms)
    if cfg.next_token_weight and len(out.lm_targets):
        terms["next_token"] = next_token_loss(out)
        loss = loss + cfg.next_token_weight * terms["next_token"]
    return loss, {k: v.detach() for k, v in terms.items()}


class PretrainingLoss(nn.Module):
    """Model + objectives as one module, so that a data-parallel wrapper sees every parameter
    (the temperatures included) used inside its forward."""

    def __init__(self, model: nn.Module, cfg: ObjectivesConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """-> loss, its terms, and the packed decoder row length."""
        out = self.model(batch, self.cfg.next_token_max_samples)
        return *total_loss(out, self.model, self.cfg), out.packed_tokens
