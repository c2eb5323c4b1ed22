"""Activation checkpointing of decoder blocks, applied from outside the model.

"full" recomputes each block's forward during backward, so activation memory
is one block's input per block instead of everything inside it. Uses
PyTorch's checkpoint wrapper (non-reentrant), the way torchtitan does.
"""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper


def apply_activation_checkpointing(decoder: nn.Module, mode: str) -> nn.Module:
    if mode == "none":
        return decoder
    if mode != "full":
        raise ValueError(f"parallel.activation_checkpointing: {mode!r}; expected 'none' or 'full'")
    for i, block in enumerate(decoder.blocks):
        decoder.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    return decoder
