"""torch.compile per block, applied to a built model from outside (as torchtitan does).

Compiled regions: each decoder block, each encoder block (those its modality's spec names: timm
ViT blocks of the image and audio towers, the video tower's blocks) and each tower's fusion. Blocks are compiled in place
(`Module.compile`), so parameter names and checkpoints do not change, with dynamic shapes: packed
rows vary in length every batch and a recompile per length would cost more than it saves. The
attention kernel is chosen before compiling (choosing logs, which would break the graph); the row
layout (`Packing`) is built once per batch outside the blocks.

Under FSDP2 the blocks are compiled without inductor's on-disk graph caches (`cache=False`).
Dynamo does not specialise the integer attributes of FSDP-managed modules (timm's
`Attention.head_dim`) as it does for plain modules, so with dynamic shapes they become symbols
whose guards name the module (`L['self']._modules['attn'].head_dim`). The FX graph cache stores
those guards but evaluates them against the graph's tensor inputs only, so the next process that
finds such an entry fails with `KeyError: 'self'` (torch 2.14) -- in practice a second rank of
the same run, compiling at the same moment. Dynamo's in-process guards are unaffected.
"""

from __future__ import annotations

import logging

import torch.nn as nn

from mmpretrain.attention import PackedAttention
from mmpretrain.encoders import MODALITIES

log = logging.getLogger(__name__)


def compiled_regions(model: nn.Module) -> list[nn.Module]:
    """The modules compiled one by one: decoder blocks, encoder blocks, fusions."""
    regions = list(model.decoder.blocks)
    for m, tower in model.towers.items():
        regions += MODALITIES[m].blocks(tower.encoder) + [tower.fusion]
    return regions


def apply_compile(model: nn.Module, device_type: str, cache: bool = True) -> nn.Module:
    """Compile every region in place. `cache=False` keeps inductor from reading or writing its
    on-disk FX graph and AOTAutograd caches for these regions (FSDP2: see the module docstring)."""
    for m in model.modules():
        if isinstance(m, PackedAttention):
            m.resolve(device_type)
    regions = compiled_regions(model)
    for region in regions:
        region.compile(dynamic=True, options=None if cache else {"fx_graph_cache": False})
    log.info("torch.compile: %d blocks (decoder, encoders, fusion), dynamic shapes%s", len(regions),
             "" if cache else ", no on-disk graph cache (FSDP2)")
    return model
