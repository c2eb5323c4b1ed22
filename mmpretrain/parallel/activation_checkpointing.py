"""Activation checkpointing of decoder blocks, applied from outside the model.

"full" recomputes each block's forward during backward, so activation memory
is one block's input per block instead of everything inside it. "selective"
keeps the outputs of the expensive ops (matmuls, attention) and recomputes only
the cheap ones (norms, activations, rotary, elementwise), an op-level policy as
in torchtitan: most of the memory of "none" goes, little of its speed. Both use
PyTorch's checkpoint wrapper (non-reentrant).

For the longest sequences (as DeepSpeed's ALST does): "offload" is "full" with the
blocks' saved inputs moved to host memory (`torch.autograd.graph.save_on_cpu`, pinned
on CUDA) until the backward pass needs them, so device memory no longer grows with the
number of layers; `tiled_mlp` runs each MLP over tiles of that many tokens, each tile
checkpointed, so the (T, hidden) intermediate never exists whole.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_aten = torch.ops.aten
# outputs worth keeping: recomputing them costs as much as the forward itself
SAVED_OPS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.linear.default,
             _aten._scaled_dot_product_flash_attention.default,
             _aten._scaled_dot_product_efficient_attention.default,
             _aten._scaled_dot_product_cudnn_attention.default,
             _aten._scaled_dot_product_flash_attention_for_cpu.default}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def tile_mlp(mlp: nn.Module, tile: int) -> None:
    """Run `mlp` over `tile` tokens at a time, each tile recomputed in backward: the same
    function, with one tile's hidden activation alive at once instead of all T tokens'. Its
    forward is replaced on the instance, so parameter names (checkpoints) do not change."""
    whole = mlp.forward

    def tiled(x: torch.Tensor) -> torch.Tensor:
        if len(x) <= tile:
            return whole(x)
        return torch.cat([checkpoint(whole, part, use_reentrant=False) for part in x.split(tile)])

    mlp.forward = tiled


def offload_saved_inputs(block: nn.Module) -> None:
    """The (checkpointed) block's saved tensors, i.e. its inputs, wait in host memory for the
    backward pass (forward replaced on the instance, names unchanged)."""
    inner = block.forward

    def offloaded(x, *args):
        with torch.autograd.graph.save_on_cpu(pin_memory=x.is_cuda):
            return inner(x, *args)

    block.forward = offloaded


def apply_activation_checkpointing(decoder: nn.Module, mode: str, tiled_mlp: int = 0) -> nn.Module:
    if tiled_mlp:
        for block in decoder.blocks:
            tile_mlp(block.mlp, tiled_mlp)
    if mode == "none":
        return decoder
    if mode not in ("full", "selective", "offload"):
        raise ValueError(f"parallel.activation_checkpointing: {mode!r}; expected none, full, selective or offload")
    extra = {"context_fn": partial(create_selective_checkpoint_contexts, _keep_matmuls)} if mode == "selective" else {}
    for i, block in enumerate(decoder.blocks):
        decoder.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False, **extra)
        if mode == "offload":
            offload_saved_inputs(decoder.blocks[i])
    return decoder
