from mmpretrain.fusion.resampler import ResamplerFusion

__all__ = ["ResamplerFusion"]
