"""Tensor parallelism of the decoder (Megatron's split), applied from outside with PyTorch's own
`parallelize_module`: in every block the q, k and v projections are split by output rows
(column-wise: each rank computes its share of the heads, attention included, with no exchange)
and the output projection by input columns (row-wise: one all-reduce of the block's attention
output); the SwiGLU's gate and up likewise by hidden unit, its down projection row-wise. Two
all-reduces per block forward (two in backward); the parameters of those projections become
DTensors sharded over the `tp` mesh dimension, which torch.distributed.checkpoint reshards to
any other degree on load. Norms, the token embedding and output head, the mixture-of-experts
layers and the encoders stay replicated: every tp rank computes them alike from the same inputs.

Not built: sequence-parallel norms (the activations between blocks are replicated, not split over
tokens) and a vocabulary-parallel loss; both save memory, neither changes the arithmetic.
"""

from __future__ import annotations

import logging

import torch.nn as nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from mmpretrain.decoder import SwiGLU

log = logging.getLogger(__name__)


def apply_tensor_parallel(decoder: nn.Module, tp_mesh) -> nn.Module:
    tp = tp_mesh.size()
    cfg = decoder.cfg
    if cfg.heads % tp or cfg.key_value_heads % tp:
        raise ValueError(f"parallel.tp={tp} must divide model.decoder.heads={cfg.heads} and its key/value "
                         f"heads ({cfg.key_value_heads})")
    for block in decoder.blocks:
        plan = {"q": ColwiseParallel(), "k": ColwiseParallel(), "v": ColwiseParallel(), "proj": RowwiseParallel()}
        if isinstance(block.mlp, SwiGLU):
            plan |= {"mlp.gate": ColwiseParallel(), "mlp.up": ColwiseParallel(), "mlp.down": RowwiseParallel()}
        parallelize_module(block, tp_mesh, plan)
    log.info("tensor parallel: the projections of %d decoder block(s) split over %d process(es)", len(decoder.blocks), tp)
    return decoder
