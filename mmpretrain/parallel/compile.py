"""torch.compile per block, applied to a built model from outside (as torchtitan does).

Compiled regions: each decoder block, each encoder block (timm ViT blocks of the image and audio
towers, the video tower's blocks) and each tower's fusion. Blocks are compiled in place
(`Module.compile`), so parameter names and checkpoints do not change, with dynamic shapes: packed
rows vary in length every batch and a recompile per length would cost more than it saves. The
attention kernel is chosen before compiling (choosing logs, which would break the graph); the row
layout (`Packing`) is built once per batch outside the blocks.
"""

from __future__ import annotations

import logging

import torch.nn as nn

from mmpretrain.attention import PackedAttention

log = logging.getLogger(__name__)


def compiled_regions(model: nn.Module) -> list[nn.Module]:
    """The modules compiled one by one: decoder blocks, encoder blocks, fusions."""
    regions = list(model.decoder.blocks)
    for tower in model.towers.values():
        blocks = getattr(getattr(tower.encoder, "vit", tower.encoder), "blocks", [])
        regions += list(blocks) + [tower.fusion]
    return regions


def apply_compile(model: nn.Module, device_type: str) -> nn.Module:
    for m in model.modules():
        if isinstance(m, PackedAttention):
            m.resolve(device_type)
    regions = compiled_regions(model)
    for region in regions:
        region.compile(dynamic=True)
    log.info("torch.compile: %d blocks (decoder, encoders, fusion), dynamic shapes", len(regions))
    return model
