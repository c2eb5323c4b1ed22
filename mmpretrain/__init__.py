"""mmpretrain: pretraining multimodal foundation models (text, image, audio, video)."""

__version__ = "0.1.0"


def load_pretrained(path, device="cpu"):
    """Load `runs/<name>/export` -> model with encode_text / encode_image / encode_audio / encode_video."""
    from mmpretrain.pretrained import load_pretrained as _load

    return _load(path, device)


def load_encoder(path, device="cpu"):
    """Load one exported tower, e.g. `runs/<name>/export/image`."""
    from mmpretrain.pretrained import load_encoder as _load

    return _load(path, device)


__all__ = ["__version__", "load_encoder", "load_pretrained"]
