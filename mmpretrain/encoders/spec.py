"""What declares a modality: one `ModalitySpec` per modality, registered in `encoders/__init__.py`.

The config, the data pipeline, the model, `parallel/`, export and downstream loading all ask
the spec, so everything about a modality (its config section and checks, file extensions,
decoding, preprocessing, encoder, the blocks to shard and compile, its start from another
tower) lives in one module (`encoders/image.py`, `encoders/audio.py`, `encoders/video.py`), and
adding a modality is one such module and its `register`.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from timm.layers import PatchDropout
from timm.layers.patch_dropout import patch_dropout_forward

from mmpretrain.batch import BadSample  # noqa: F401 (the decoders raise it; imported from here too)
from mmpretrain.config import ConfigError


@dataclass(frozen=True)
class ModalitySpec:
    name: str  # also the key of its section in ModelConfig (model.image, model.audio)
    # that section's dataclass; its `width` is the encoder's token width (the fusion's heads divide it)
    config: type
    # section -> module mapping a batch to tokens (B, N, width), with `width` and `init_weights()`:
    # its initialisation after PyTorch's `reset_parameters` on every module (a model built on the
    # meta device, then allocated: parallel/fsdp.py `materialize`)
    encoder: Callable[[Any], nn.Module]
    extensions: tuple[str, ...]  # WebDataset member extensions, in order of preference
    # shard member bytes -> one model input; rng: a random.Random for training, None for eval
    # (deterministic). Raises BadSample.
    decode: Callable[[bytes, Any, random.Random | None], torch.Tensor]
    # downstream raw inputs -> a model input batch, with the code `decode` uses after decoding
    preprocess: Callable[..., torch.Tensor]
    media_shape: Callable[[Any], tuple[int, ...]]  # section -> shape of one model input
    # (section, ModelConfig) -> None: the checks across fields (geometry the encoder would assert
    # later), each a ConfigError naming the key; config.validate runs it for each modality in use
    validate: Callable[[Any, Any], None]
    # encoder -> its blocks: each one is sharded by FSDP2 and compiled on its own (parallel/)
    blocks: Callable[[nn.Module], list[nn.Module]]
    # (encoder, {modality: encoder} of every tower) -> None: a start from another tower's weights,
    # once every tower is built or initialised (video from image)
    init_from: Callable[[nn.Module, dict[str, nn.Module]], None] | None = None
    # (raw sample, the sample parsed so far, Config, rng or None) -> media to add to it (a video's
    # own audio track); data/samples.py runs it for every registered modality, after the decoding
    extras: Callable[[dict, dict, Any, random.Random | None], dict] | None = None
    # (encoder, checkpoint file, its config key) -> a log line: the encoder's weights from a
    # pretrained checkpoint (model.<name>.pretrained; weights.py), after the model is built
    load_pretrained: Callable[[nn.Module, str, str], str] | None = None
    # masked modelling (objectives.masked_weight) can reconstruct this modality's tokens: its
    # encoder has `patches` (a `Patches`) and `forward(x, masked=True)` -> (tokens, kept patch
    # indices (B, K) or None when nothing was dropped, the input's patches (B, N, D))
    masked: bool = False

    def section(self, model_cfg):
        """This modality's config section of a ModelConfig."""
        return model_cfg.sections[self.name]


# ---------------------------------------------------------------------------- config checks
# what the modalities' `validate` share


def check_heads(section: str, cfg) -> None:
    """A transformer's heads split its width."""
    if cfg.width % cfg.heads:
        raise ConfigError(f"{section}.heads: {cfg.heads} does not divide {section}.width={cfg.width}")


def check_normalisation(section: str, mean: list[float], std: list[float]) -> None:
    """Per-channel pixel normalisation: the error names the key at fault."""
    for key, values in (("mean", mean), ("std", std)):
        if len(values) != 3:
            raise ConfigError(f"{section}.{key}: {values}; expected 3 values, one per colour channel")
    if not all(x > 0 for x in std):
        raise ConfigError(f"{section}.std: {std}; expected values > 0")


# ---------------------------------------------------------------------------- downstream inputs
# what the modalities' `preprocess` share: files given by path or bytes, NumPy arrays or tensors


def file_bytes(x) -> bytes | None:
    """A path (str or os.PathLike) or a file's bytes -> those bytes; anything else -> None."""
    if isinstance(x, bytes):
        return x
    return Path(x).read_bytes() if isinstance(x, (str, os.PathLike)) else None


def file_name(x) -> str:
    return "bytes" if isinstance(x, bytes) else str(x)


def as_tensor(x, what: str, accepted: str) -> torch.Tensor:
    """A NumPy array or a tensor -> a tensor; anything else is a TypeError saying what is accepted."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        # copied where torch cannot share it: flipped (negative strides) or read-only (np.asarray(pil))
        return torch.from_numpy(np.require(x, requirements=("C_CONTIGUOUS", "WRITEABLE")))
    raise TypeError(f"{what} inputs: expected {accepted}; got {type(x).__name__}")


def channels_first(x: torch.Tensor, what: str, channels: tuple[int, ...] = (3,)) -> torch.Tensor:
    """uint8 pixels (..., H, W, C) (PIL, NumPy, OpenCV) or (..., C, H, W) (torchvision), C one of
    `channels` -> (..., C, H, W). A 3 in one place alone decides (an RGB image 4 pixels high stays
    RGB); a shape with such a C in both places, or in neither, is refused, never guessed."""
    if x.dtype != torch.uint8:
        raise ValueError(f"{what} inputs: pixels are uint8 (float tensors: already preprocessed); got "
                         f"{str(x.dtype).removeprefix('torch.')}")
    for counts in ((3,), channels):
        last, first = x.shape[-1] in counts, x.shape[-3] in counts
        if last != first:
            return x.movedim(-1, -3) if last else x
        if last:  # in both places
            break
    c = " or ".join(map(str, channels))
    raise ValueError(f"{what} inputs: cannot tell the channel axis of {tuple(x.shape)}: expected {c} "
                     f"channels either last (..., H, W, C) or before height and width (..., C, H, W)")


# ---------------------------------------------------------------------------- masked modelling
# what the towers share for token dropout's indices and masked modelling's targets


@dataclass(frozen=True)
class Patches:
    """The grid of patches an encoder's tokens stand for, in token order (row-major over the grid,
    as a strided convolution's output flattens): what masked modelling reconstructs.
    `normalise`: the target is each patch normalised by its own mean and variance (MAE's
    norm_pix_loss; pixels), else the values themselves (log-mel, as AudioMAE)."""

    grid: tuple[int, ...]  # patches along each axis of the input (time, height, width, ...)
    size: tuple[int, ...]  # one patch's extent along those axes
    channels: int
    normalise: bool = True

    @property
    def count(self) -> int:
        return math.prod(self.grid)

    @property
    def dim(self) -> int:
        return math.prod(self.size) * self.channels

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *axes) -> (B, count, dim), each patch's values in (*size, C) order."""
        n = len(self.grid)
        x = x.reshape(len(x), self.channels, *(v for g, s in zip(self.grid, self.size) for v in (g, s)))
        x = x.permute(0, *range(2, 2 + 2 * n, 2), *range(3, 3 + 2 * n, 2), 1)
        return x.reshape(len(x), self.count, self.dim)

    def join(self, patches: torch.Tensor) -> torch.Tensor:
        """`split`'s inverse: (B, count, dim) -> (B, C, *axes)."""
        n = len(self.grid)
        x = patches.reshape(len(patches), *self.grid, *self.size, self.channels)
        x = x.permute(0, 2 * n + 1, *(v for i in range(n) for v in (1 + i, 1 + n + i)))
        return x.reshape(len(x), self.channels, *(g * s for g, s in zip(self.grid, self.size)))


def drop_tokens(drop: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A tower's token dropout (timm's PatchDropout, or nn.Identity without one) -> (kept tokens,
    the kept patch tokens' indices (B, K) or None when none were dropped). timm's own module
    returns no indices (its PatchDropoutWithIndices is a separate module that timm's ViT does not
    build); its function does, and it is the same keep rule."""
    if isinstance(drop, PatchDropout):
        return patch_dropout_forward(x, drop.prob, drop.num_prefix_tokens, drop.ordered, drop.training)
    return x, None


def vit_features(vit: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """timm VisionTransformer.forward_features (patch and position embedding, token dropout, the
    blocks and norms), also returning the kept indices that forward_features keeps to itself."""
    x, keep = drop_tokens(vit.patch_drop, vit._pos_embed(vit.patch_embed(x)))
    return vit.norm(vit.blocks(vit.norm_pre(x))), keep
