"""Next-token captioning: the vocabulary-wide cross-entropy, chunked so its logits never exist at once."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmpretrain.model import ModelOutput


def _cross_entropy_sum(h: torch.Tensor, head: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = h @ head.t()  # at least fp32 for the vocabulary-wide softmax under bf16 autocast
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="sum")


def chunked_cross_entropy(h: torch.Tensor, head: torch.Tensor, targets: torch.Tensor,
                          chunk: int = 2048) -> torch.Tensor:
    """Mean cross-entropy of softmax(h @ head.T) over (P,) targets, `chunk` positions at a time:
    the (P, vocab) fp32 logits (49k columns) never exist at once, and each chunk's are recomputed
    in the backward pass instead of being kept (activation checkpointing of the head)."""
    if len(h) <= chunk:
        return _cross_entropy_sum(h, head, targets) / len(h)
    total = sum(torch.utils.checkpoint.checkpoint(_cross_entropy_sum, h[i : i + chunk], head,
                                                  targets[i : i + chunk], use_reentrant=False)
                for i in range(0, len(h), chunk))
    return total / len(h)


def next_token_loss(out: ModelOutput, chunk: int = 2048) -> torch.Tensor:
    return chunked_cross_entropy(out.lm_hidden, out.lm_head, out.lm_targets, chunk)
