"""Masked modelling (MAE, AudioMAE, VideoMAE): a light decoder reconstructs the patches that a
tower's token dropout removed, from the encoder's outputs at the kept ones.

The mask is token dropout's (`model.<modality>.token_dropout`): the encoder never sees the
dropped patches, as in MAE, so the same forward serves the contrastive embedding and the
reconstruction. The decoder (MAE's design at a small size) embeds the kept tokens, puts a learned
mask token at every dropped position, adds learned positions, runs a few timm blocks and predicts
each patch's values; the loss is the mean squared error over the dropped patches only. Targets
are each patch normalised by its own mean and variance for pixels (MAE's norm_pix_loss) and the
log-mel values themselves for audio (AudioMAE's), as the tower's `Patches` says.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

from mmpretrain.encoders.spec import Patches


class MaskedDecoder(nn.Module):
    """Encoder tokens (B, 1 + K, in_width), the class token first, and the kept patches' indices
    (B, K) -> predicted values of every patch (B, N, patch dim)."""

    def __init__(self, in_width: int, patches: Patches, width: int, depth: int, heads: int):
        super().__init__()
        self.patches = patches
        self.embed = nn.Linear(in_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + patches.count, width))  # class token first
        self.blocks = nn.Sequential(*[Block(width, heads, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, patches.dim)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)  # MAE's

    def no_weight_decay(self) -> set[str]:
        return {"mask_token", "pos_embed"}

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        cls, kept = x[:, :1], x[:, 1:]
        full = self.mask_token.expand(len(x), self.patches.count, -1).to(x.dtype)
        full = full.scatter(1, keep[..., None].expand_as(kept), kept)  # kept tokens back in place
        x = torch.cat([cls, full], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 1:])


def targets(patches: torch.Tensor, spec: Patches) -> torch.Tensor:
    """What the decoder predicts: each patch normalised by its own statistics (pixels), or as is."""
    if not spec.normalise or not len(patches):
        return patches
    mean, var = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + 1e-6) ** 0.5


def dropped_mask(keep: torch.Tensor, count: int) -> torch.Tensor:
    """(B, K) kept indices -> (B, count) float, 1 where the patch was dropped."""
    return torch.ones(len(keep), count, device=keep.device).scatter_(1, keep, 0.0)


def masked_loss(pred: torch.Tensor, patches: torch.Tensor, keep: torch.Tensor, spec: Patches) -> torch.Tensor:
    """MAE's loss: each patch's mean squared error, averaged over the dropped patches only."""
    per_patch = (pred.float() - targets(patches.float(), spec)).pow(2).mean(dim=-1)
    dropped = dropped_mask(keep, spec.count)
    return (per_patch * dropped).sum() / dropped.sum().clamp_min(1.0)  # 0 on an empty batch, with a graph


@torch.no_grad()
def reconstruct(pred: torch.Tensor, patches: torch.Tensor, keep: torch.Tensor,
                spec: Patches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a figure, in the input's own space (B, C, *axes): the input, the input with its
    dropped patches zeroed, and the kept patches with the predictions in the dropped ones
    (normalised predictions put back at each patch's own mean and variance, as MAE shows them)."""
    pred, patches = pred.float(), patches.float()
    if spec.normalise:
        mean, var = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    dropped = dropped_mask(keep, spec.count)[..., None]
    return spec.join(patches), spec.join(patches * (1 - dropped)), spec.join(patches * (1 - dropped) + pred * dropped)


@torch.no_grad()
def examples(task: nn.Module, batch, n: int = 4) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Held-out reconstructions for a figure: modality -> `reconstruct`'s three tensors for the
    first `n` samples of `batch` that have it, each masked as training masks (token dropout on,
    whatever mode the model is in). None while nothing is dropped (the unmasked phase)."""
    from timm.layers import PatchDropout

    out = {}
    for m, decoder in task.objectives.masked_decoders.items():
        x = batch.media[m][batch.present[m]][:n]
        encoder = task.model.towers[m].encoder
        drops = [d for d in encoder.modules() if isinstance(d, PatchDropout)]
        modes = [d.training for d in drops]
        for d in drops:
            d.train()
        try:
            tokens, keep, patches = encoder(x, masked=True)
        finally:
            for d, mode in zip(drops, modes):
                d.train(mode)
        if keep is not None and len(x):
            out[m] = reconstruct(decoder(tokens, keep), patches, keep, decoder.patches)
    return out
