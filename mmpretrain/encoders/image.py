"""Image encoder: timm's VisionTransformer, returning its token sequence."""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from mmpretrain.config import ImageEncoderConfig


class ImageEncoder(nn.Module):
    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"model.image: image_size {cfg.image_size} is not a multiple of "
                             f"patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.width = cfg.width
        self.vit = VisionTransformer(img_size=cfg.image_size, patch_size=cfg.patch_size, num_classes=0,
                                     global_pool="", embed_dim=cfg.width, depth=cfg.depth,
                                     num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, S, S) normalised -> tokens (B, 1 + patches, width)."""
        return self.vit.forward_features(images)
