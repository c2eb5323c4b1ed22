"""Training objectives: symmetric InfoNCE between modality pairs, and next-token captioning.

The objectives own their state: which pairs are contrasted and each pair's
learnable temperature. `PretrainingTask` puts model and objectives in one
module (open_clip calls it a training task), so that a data-parallel wrapper
sees every parameter, the temperatures included, used inside its forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmpretrain.batch import Batch
from mmpretrain.config import ObjectivesConfig
from mmpretrain.model import ModelOutput, MultimodalModel
from mmpretrain.packing import RowLayout


def contrastive_pairs(modalities: list[str], media_pairs: bool) -> list[tuple[str, str]]:
    pairs = [("text", m) for m in modalities]
    if media_pairs:
        pairs += [(a, b) for i, a in enumerate(modalities) for b in modalities[i + 1 :]]
    return pairs


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


def contrastive_losses(out: ModelOutput, logit_scales, group=None) -> dict[str, torch.Tensor]:
    """One loss per pair in `logit_scales` ("text-image", ...), over the samples of every rank in
    the data-parallel `group` that have both sides."""
    rows = gather_with_grad({**{f"emb/{m}": e for m, e in out.embeddings.items()},
                             **{f"has/{m}": p.float() for m, p in out.present.items()}}, group)
    feats = {m: rows[f"emb/{m}"] for m in out.embeddings}
    present = {m: rows[f"has/{m}"].bool() for m in out.present}
    losses = {}
    for pair, param in logit_scales.items():
        a, b = pair.split("-")
        both = present[a] & present[b]
        if int(both.sum()) < 2:
            continue  # no negatives: nothing to contrast
        scale = param.exp()  # kept within [1, max_logit_scale] by Objectives.clamp_ after each step
        losses[f"contrastive/{pair}"] = clip_loss(feats[a][both], feats[b][both], scale)
    return losses


def _cross_entropy_sum(h: torch.Tensor, head: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = h @ head.t()  # at least fp32 for the vocabulary-wide softmax under bf16 autocast
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="sum")


def chunked_cross_entropy(h: torch.Tensor, head: torch.Tensor, targets: torch.Tensor,
                          chunk: int = 2048) -> torch.Tensor:
    """Mean cross-entropy of softmax(h @ head.T) over (P,) targets, `chunk` positions at a time:
    the (P, vocab) fp32 logits (49k columns) never exist at once, and each chunk's are recomputed
    in the backward pass instead of being kept (activation checkpointing of the head)."""
    if len(h) <= chunk:
        return _cross_entropy_sum(h, head, targets) / len(h)
    total = sum(torch.utils.checkpoint.checkpoint(_cross_entropy_sum, h[i : i + chunk], head,
                                                  targets[i : i + chunk], use_reentrant=False)
                for i in range(0, len(h), chunk))
    return total / len(h)


def next_token_loss(out: ModelOutput, chunk: int = 2048) -> torch.Tensor:
    return chunked_cross_entropy(out.lm_hidden, out.lm_head, out.lm_targets, chunk)


class Objectives(nn.Module):
    """Weighted contrastive + next-token loss, with one learnable temperature per pair.
    `gather_group`: the data-parallel group the contrastive loss gathers over (None: this process
    alone)."""

    def __init__(self, modalities: list[str], cfg: ObjectivesConfig, gather_group=None):
        super().__init__()
        self.cfg = cfg
        # stored as log(1/T) as in CLIP; shape (1,), not a scalar, so that FSDP2 can shard it
        self.logit_scale = nn.ParameterDict({
            f"{a}-{b}": nn.Parameter(torch.tensor([math.log(1 / cfg.init_temperature)]))
            for a, b in contrastive_pairs(modalities, cfg.media_pairs)})
        self.gather_group = gather_group

    def forward(self, out: ModelOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-> (loss, {term: detached value}) for logging."""
        cfg = self.cfg
        terms = contrastive_losses(out, self.logit_scale, self.gather_group) if cfg.contrastive_weight else {}
        loss = out.lm_hidden.new_zeros((), dtype=torch.float32)
        if terms:
            loss = loss + cfg.contrastive_weight * sum(terms.values()) / len(terms)
        if cfg.next_token_weight and len(out.lm_targets):
            terms["next_token"] = next_token_loss(out)
            loss = loss + cfg.next_token_weight * terms["next_token"]
        return loss, {k: v.detach() for k, v in terms.items()}

    @torch.no_grad()
    def init_weights(self) -> None:
        """The initial temperatures again (a model built on the meta device is allocated empty)."""
        for p in self.logit_scale.values():
            p.fill_(math.log(1 / self.cfg.init_temperature))

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep each log(1/T) in [0, ln(max_logit_scale)], as a parameter after the optimizer step
        (open_clip's behaviour): clamping inside the loss would zero its gradient at the bound."""
        for p in self.logit_scale.values():
            p.clamp_(0, math.log(self.cfg.max_logit_scale))


class PretrainingTask(nn.Module):
    """Model + objectives: batch -> (loss, terms). Its parameters are the model's, then the
    temperatures."""

    def __init__(self, model: MultimodalModel, objectives: Objectives, layout: RowLayout):
        super().__init__()
        self.model, self.objectives, self.layout = model, objectives, layout

    @torch.no_grad()
    def init_weights(self) -> None:
        """The initialisation of a task built on the meta device, once allocated and every module's
        `reset_parameters` has run (parallel/fsdp.py `materialize`): each part that needs more has
        an `init_weights` that its container calls, from here down."""
        self.objectives.init_weights()
        self.model.init_weights()

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.objectives(self.model(batch, self.layout))
