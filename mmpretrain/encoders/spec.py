"""What declares a modality: one `ModalitySpec` per modality, registered in `encoders/__init__.py`.

The data pipeline, the model, export and downstream loading all ask the spec,
so a modality's file extensions, decoding, preprocessing and encoder live in
one module (`encoders/image.py`, `encoders/audio.py`), and adding a modality
touches that module, its config section and one registry line.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn


class BadSample(Exception):
    """A sample that cannot be used; `reason` is the short tag the pipeline counts it under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ModalitySpec:
    name: str  # also the key of its section in ModelConfig (model.image, model.audio)
    config: type  # that section's dataclass
    encoder: Callable[[Any], nn.Module]  # section -> module mapping a batch to tokens (B, N, width)
    extensions: tuple[str, ...]  # WebDataset member extensions, in order of preference
    # shard member bytes -> one model input; rng: a random.Random for training, None for eval
    # (deterministic). Raises BadSample.
    decode: Callable[[bytes, Any, random.Random | None], torch.Tensor]
    # downstream raw inputs -> a model input batch, with the code `decode` uses after decoding
    preprocess: Callable[..., torch.Tensor]
    media_shape: Callable[[Any], tuple[int, ...]]  # section -> shape of one model input

    def section(self, model_cfg):
        """This modality's config section of a ModelConfig."""
        return getattr(model_cfg, self.name)
