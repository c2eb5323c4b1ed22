"""Activation checkpointing of decoder blocks, applied from outside the model.

"full" recomputes each block's forward during backward, so activation memory
is one block's input per block instead of everything inside it. "selective"
keeps the outputs of the expensive ops (matmuls, attention) and recomputes only
the cheap ones (norms, activations, rotary, elementwise), an op-level policy as
in torchtitan: most of the memory of "none" goes, little of its speed. Both use
PyTorch's checkpoint wrapper (non-reentrant).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

_aten = torch.ops.aten
# outputs worth keeping: recomputing them costs as much as the forward itself
SAVED_OPS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.linear.default,
             _aten._scaled_dot_product_flash_attention.default,
             _aten._scaled_dot_product_efficient_attention.default,
             _aten._scaled_dot_product_cudnn_attention.default,
             _aten._scaled_dot_product_flash_attention_for_cpu.default}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(decoder: nn.Module, mode: str) -> nn.Module:
    if mode == "none":
        return decoder
    if mode not in ("full", "selective"):
        raise ValueError(f"parallel.activation_checkpointing: {mode!r}; expected 'none', 'full' or 'selective'")
    extra = {"context_fn": partial(create_selective_checkpoint_contexts, _keep_matmuls)} if mode == "selective" else {}
    for i, block in enumerate(decoder.blocks):
        decoder.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False, **extra)
    return decoder
