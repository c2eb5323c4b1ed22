"""Fusion: encoder tokens -> a fixed number of decoder-width tokens, and the modality's
contrastive embedding pooled from the same latents.

Why a resampler and not a per-token projector: a projector passes every
encoder token to the decoder, so a 224 px image costs 196+ decoder tokens and
a video hundreds per frame, and the decoder's budget depends on media
resolution and length. A resampler (learned latent queries cross-attending to
the encoder tokens, as Flamingo's perceiver resampler) gives each media item a
fixed, configurable number of tokens, which keeps packing budgets predictable
and lets long video fit; the price is a bottleneck on fine detail, which
`num_latents` trades off. The attention pooling is timm's `AttentionPoolLatent`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import AttentionPoolLatent

from mmpretrain.config import FusionConfig


class ResamplerFusion(nn.Module):
    """A perceiver-style resampler feeding the decoder, with the contrastive embedding head."""

    def __init__(self, in_width: int, out_width: int, cfg: FusionConfig):
        super().__init__()
        self.pool = AttentionPoolLatent(in_width, num_heads=cfg.heads, latent_len=cfg.num_latents,
                                        pool_type="")
        self.to_decoder = nn.Linear(in_width, out_width)
        self.modality_embed = nn.Parameter(torch.zeros(out_width))
        self.embed_pool = cfg.embed_pool
        if cfg.embed_pool == "attention":
            self.embed_attention = AttentionPoolLatent(in_width, num_heads=cfg.heads, pool_type="token")
        self.embed_norm = nn.LayerNorm(in_width)
        self.to_embedding = nn.Linear(in_width, cfg.embed_dim, bias=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The attention pools' own initialisation (timm's), the modality embedding at zero (the
        norm and linears have PyTorch's `reset_parameters`)."""
        if self.embed_pool == "attention":
            self.embed_attention.init_weights()
        self.pool.init_weights()
        self.modality_embed.zero_()

    def no_weight_decay(self) -> set[str]:
        """Parameters (relative names) that take no weight decay: the latent queries and the
        modality embedding are positions in input space, not weights (as timm's ViT tokens)."""
        return {"pool.latent", "modality_embed", "embed_attention.latent"}

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens: (B, N, in_width), the class token first -> decoder tokens (B, K, out_width),
        embedding (B, embed_dim)."""
        latents = self.pool(tokens)  # (B, K, in_width)
        if self.embed_pool == "cls":
            pooled = tokens[:, 0]
        elif self.embed_pool == "attention":
            pooled = self.embed_attention(tokens)
        else:
            pooled = latents.mean(dim=1)
        return self.to_decoder(latents) + self.modality_embed, self.to_embedding(self.embed_norm(pooled))
