"""An mmpretrain export as a CLIP_benchmark model: `load_mmpretrain` has the signature of its model
loaders (clip_benchmark.models.TYPE2FUNC) and returns what they return, (model with encode_image /
encode_text, image transform, tokenizer), so its own zeroshot_classification.evaluate and
zeroshot_retrieval.evaluate run on the export:

    from clip_benchmark.models import TYPE2FUNC
    from mmpretrain.eval.clip_benchmark import load_mmpretrain
    TYPE2FUNC["mmpretrain"] = load_mmpretrain
    model, transform, tokenizer = load_mmpretrain(pretrained="runs/demo/export")
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mmpretrain.encoders import MODALITIES
from mmpretrain.pretrained import Pretrained, load_pretrained


class ClipBenchmarkModel(nn.Module):
    """encode_image: preprocessed images (B, 3, S, S) -> (B, E); encode_text: the tokenizer's
    tokens (B, context_length) -> (B, E) (each caption ends at its eot token)."""

    def __init__(self, pretrained: Pretrained):
        super().__init__()
        self.pretrained = pretrained

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.pretrained.encode_image(images)

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        lengths = (tokens == self.pretrained.tokenizer.eot_id).int().argmax(dim=1) + 1
        return self.pretrained.model.encode_text(tokens, lengths)


def load_mmpretrain(model_name: str | None = None, pretrained: str = "runs/demo/export", cache_dir: str | None = None,
                    device: str | torch.device = "cpu"):
    """CLIP_benchmark's loader signature: `pretrained` is the export folder; model_name and
    cache_dir are unused. -> (model, transform: PIL image -> (3, S, S), tokenizer: texts -> tokens)."""
    model = load_pretrained(pretrained, device)
    image_cfg = model.cfg.image
    transform = lambda image: MODALITIES["image"].preprocess(image, image_cfg)[0]  # noqa: E731
    tokenizer = lambda texts: model.tokenizer(texts)[0]  # noqa: E731
    return ClipBenchmarkModel(model), transform, tokenizer
