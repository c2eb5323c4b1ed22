"""Training objectives: contrastive (InfoNCE or SigLIP) between modality pairs, and next-token
captioning.

The objectives own their state: which pairs are contrasted, each pair's learnable temperature
(and SigLIP's bias). `PretrainingTask` puts model and objectives in one module (open_clip calls
it a training task), so that a data-parallel wrapper sees every parameter, the temperatures
included, used inside its forward. One module per loss: `infonce`, `siglip`, `next_token`,
`distill`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from mmpretrain.batch import Batch
from mmpretrain.config import ObjectivesConfig
from mmpretrain.model import ModelOutput, MultimodalModel
from mmpretrain.moe import take_aux_loss
from mmpretrain.objectives.distill import distill_terms
from mmpretrain.objectives.infonce import clip_loss, gather_with_grad
from mmpretrain.objectives.masked import MaskedDecoder, masked_loss
from mmpretrain.objectives.next_token import chunked_cross_entropy, next_token_loss
from mmpretrain.objectives.siglip import siglip_loss
from mmpretrain.packing import RowLayout

__all__ = ["Objectives", "PretrainingTask", "chunked_cross_entropy", "clip_loss", "contrastive_losses",
           "contrastive_pairs", "gather_with_grad", "next_token_loss", "siglip_loss"]


def contrastive_pairs(modalities: list[str], media_pairs: bool) -> list[tuple[str, str]]:
    pairs = [("text", m) for m in modalities]
    if media_pairs:
        pairs += [(a, b) for i, a in enumerate(modalities) for b in modalities[i + 1 :]]
    return pairs


def contrastive_losses(out: ModelOutput, logit_scales, group=None, logit_biases=None, exchange: str = "ring",
                       chunk: int = 0) -> dict[str, torch.Tensor]:
    """One loss per pair in `logit_scales` ("text-image", ...), over the samples of every rank in
    the data-parallel `group` that have both sides: InfoNCE, or SigLIP with `logit_biases` (one
    per pair; `exchange` and `chunk` as `siglip.siglip_loss` takes them)."""
    if logit_biases is not None:
        return _siglip_losses(out, logit_scales, logit_biases, group, exchange, chunk)
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


def _siglip_losses(out: ModelOutput, logit_scales, logit_biases, group, exchange: str,
                   chunk: int) -> dict[str, torch.Tensor]:
    """SigLIP per pair over the local rows with both sides: the other ranks' rows reach each rank
    inside `siglip_loss` (every rank calls it for every pair, with rows or without)."""
    losses = {}
    for pair, param in logit_scales.items():
        a, b = pair.split("-")
        both = out.present[a] & out.present[b]
        loss = siglip_loss(out.embeddings[a][both], out.embeddings[b][both], param.exp(), logit_biases[pair],
                           group, exchange, chunk)
        if loss is not None:
            losses[f"contrastive/{pair}"] = loss
    return losses


class Objectives(nn.Module):
    """Weighted contrastive + next-token loss, with one learnable temperature per pair.
    `gather_group`: the data-parallel group the contrastive loss gathers over (None: this process
    alone). `masked`: the encoders that masked modelling reconstructs for, by modality (their
    width and `patches`); each gets its light decoder here, trained with the model and kept out
    of its export."""

    def __init__(self, modalities: list[str], cfg: ObjectivesConfig, gather_group=None,
                 masked: dict[str, nn.Module] | None = None):
        super().__init__()
        self.cfg = cfg
        pairs = [f"{a}-{b}" for a, b in contrastive_pairs(modalities, cfg.media_pairs)]
        # stored as log(1/T) as in CLIP; shape (1,), not a scalar, so that FSDP2 can shard it
        self.logit_scale = nn.ParameterDict({p: nn.Parameter(torch.empty(1)) for p in pairs})
        # SigLIP's learnable bias per pair (its paper's initialisation: -10, with T = 1/10)
        self.logit_bias = nn.ParameterDict({p: nn.Parameter(torch.empty(1)) for p in pairs}) \
            if cfg.contrastive == "siglip" else None
        self.masked_decoders = nn.ModuleDict({
            m: MaskedDecoder(enc.width, enc.patches, cfg.masked_decoder_width, cfg.masked_decoder_depth,
                             cfg.masked_decoder_heads) for m, enc in (masked or {}).items()})
        self.gather_group = gather_group
        self.init_weights()

    def set_teacher(self, teacher) -> None:
        """The distillation teacher (objectives/distill.py), held outside the module tree: no
        parameters of its own here, so no optimizer state, no sharding, not in checkpoints."""
        object.__setattr__(self, "teacher", teacher)

    def forward(self, out: ModelOutput, batch: Batch | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-> (loss, {term: detached value}) for logging. `batch`: what the teacher embeds."""
        cfg = self.cfg
        teacher = getattr(self, "teacher", None)
        distilled = {}
        if teacher is not None and batch is not None and cfg.distill.weight:
            distilled = distill_terms(out, *teacher.embed(batch), self.logit_scale, self.gather_group,
                                      cfg.distill.temperature)
        terms = contrastive_losses(out, self.logit_scale, self.gather_group, self.logit_bias, cfg.siglip_exchange,
                                   cfg.siglip_chunk) if cfg.contrastive_weight else {}
        loss = out.lm_hidden.new_zeros((), dtype=torch.float32)
        if terms:
            loss = loss + cfg.contrastive_weight * sum(terms.values()) / len(terms)
        if distilled:
            loss = loss + cfg.distill.weight * sum(distilled.values()) / len(distilled)
            terms.update(distilled)
        if cfg.next_token_weight and len(out.lm_targets):
            terms["next_token"] = next_token_loss(out)
            loss = loss + cfg.next_token_weight * terms["next_token"]
        if out.masked and cfg.masked_weight:
            masked = {f"masked/{m}": self.masked_loss(m, *out.masked[m], out.present[m]) for m in out.masked}
            loss = loss + cfg.masked_weight * sum(masked.values()) / len(masked)
            terms.update(masked)
        return loss, {k: v.detach() for k, v in terms.items()}

    def masked_loss(self, modality: str, tokens: torch.Tensor, keep: torch.Tensor, patches: torch.Tensor,
                    present: torch.Tensor) -> torch.Tensor:
        """Masked modelling's loss for one tower, over the samples that have its modality."""
        decoder = self.masked_decoders[modality]
        return masked_loss(decoder(tokens[present], keep[present]), patches[present], keep[present],
                           decoder.patches)

    @property
    def masked_modalities(self) -> tuple[str, ...]:
        return tuple(self.masked_decoders)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The initial temperatures (and SigLIP's biases) and the masked decoders' own
        initialisation, also again once a model built on the meta device is allocated empty."""
        for decoder in self.masked_decoders.values():
            decoder.init_weights()
        siglip = self.logit_bias is not None
        for p in self.logit_scale.values():
            p.fill_(math.log(1 / (self.cfg.siglip_init_temperature if siglip else self.cfg.init_temperature)))
        for p in (self.logit_bias or {}).values():
            p.fill_(self.cfg.siglip_init_bias)

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
        loss, terms = self.objectives(self.model(batch, self.layout, self.objectives.masked_modalities), batch)
        aux = take_aux_loss(self.model.decoder)  # mixture-of-experts' Switch loss (moe.balance=aux)
        if aux is not None:
            loss = loss + self.model.decoder.cfg.moe.aux_weight * aux
            terms["moe/aux"] = aux.detach()
        return loss, terms
