from mmpretrain.fusion.resampler import Resampler

__all__ = ["Resampler"]
