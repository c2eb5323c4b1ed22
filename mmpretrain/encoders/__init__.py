"""Modality encoders, each declared once by its `ModalitySpec`; this registry lists them."""

from mmpretrain.encoders.audio import AUDIO, AudioEncoder
from mmpretrain.encoders.image import IMAGE, ImageEncoder
from mmpretrain.encoders.spec import BadSample, ModalitySpec
from mmpretrain.encoders.video import VIDEO, VideoEncoder

# Registry order is the order in which a sample's media are decoded (and draw from its RNG).
MODALITIES: dict[str, ModalitySpec] = {spec.name: spec for spec in (IMAGE, AUDIO, VIDEO)}

__all__ = ["AudioEncoder", "BadSample", "ImageEncoder", "MODALITIES", "ModalitySpec", "VideoEncoder"]
