from mmpretrain.encoders.audio import AudioEncoder
from mmpretrain.encoders.image import ImageEncoder
from mmpretrain.encoders.text import Tokenizer

ENCODERS = {"image": ImageEncoder, "audio": AudioEncoder}

__all__ = ["AudioEncoder", "ENCODERS", "ImageEncoder", "Tokenizer"]
