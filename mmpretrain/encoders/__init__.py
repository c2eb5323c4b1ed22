"""Modality encoders, each declared once by its `ModalitySpec`; this registry lists them."""

import dataclasses

from mmpretrain.config import ModelConfig
from mmpretrain.encoders.audio import AUDIO, AudioEncoder
from mmpretrain.encoders.image import IMAGE, ImageEncoder
from mmpretrain.encoders.spec import BadSample, ModalitySpec
from mmpretrain.encoders.video import VIDEO, VideoEncoder

# Registry order is the order in which a sample's media are decoded (and draw from its RNG), and
# that of the modalities' sections in a config (model.image, model.audio, model.video).
MODALITIES: dict[str, ModalitySpec] = {}


def register(spec: ModalitySpec) -> ModalitySpec:
    """Add a modality: from now on `model.modalities` accepts its name, and every config read or
    built has its section model.<name>."""
    taken = list(MODALITIES) + [f.name for f in dataclasses.fields(ModelConfig)]
    if spec.name in taken:
        raise ValueError(f"modality {spec.name!r}: the name is taken (model.{', model.'.join(taken)})")
    MODALITIES[spec.name] = spec
    return spec


register(IMAGE)
register(AUDIO)
register(VIDEO)

__all__ = ["AudioEncoder", "BadSample", "ImageEncoder", "MODALITIES", "ModalitySpec", "VideoEncoder", "register"]
