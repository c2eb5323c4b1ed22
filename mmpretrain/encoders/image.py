"""Images: the config section, decoding (Pillow), preprocessing and the encoder (timm's
VisionTransformer)."""

from __future__ import annotations

import functools
import io
import random
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from torchvision.transforms.v2 import functional as TF

from mmpretrain.config import ConfigError, _check
from mmpretrain.encoders.spec import (BadSample, ModalitySpec, Patches, as_tensor, channels_first, check_heads,
                                      check_normalisation, file_bytes, file_name, vit_features)
from mmpretrain.weights import load_vit


@dataclass
class ImageEncoderConfig:
    """A timm VisionTransformer and the preprocessing it was trained with."""

    image_size: int = _check(8, default=32)
    patch_size: int = _check(1, default=4)
    width: int = _check(8, default=128)
    depth: int = _check(1, default=4)
    heads: int = _check(1, default=4)
    mlp_ratio: float = _check(1.0, default=4.0)
    # CLIP's ViT (open_clip's VisionTransformer) in timm's: a LayerNorm before the blocks (ln_pre;
    # timm's pre_norm, which drops the patch bias) and open_clip's initialisation (PyTorch's default
    # for linear layers, Xavier for the attention input, class token and position embedding drawn
    # with std width^-0.5) instead of timm's (truncated normal 0.02). At the demo's sizes the
    # timm-style tower learned object layout far more slowly (benchmarks/RESULTS.md, learning
    # against open_clip).
    pre_norm: bool = True
    init: Literal["clip", "timm"] = "clip"
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    max_pixels: int = _check(1, default=64_000_000)  # decompression-bomb guard
    # FLIP's token dropout: this fraction of the patch tokens dropped at random per sample in
    # training (never in evaluation; the class token always kept), timm's PatchDropout
    token_dropout: float = _check(0.0, below=1.0, default=0.0)
    # a timm ViT or OpenAI-CLIP / open_clip checkpoint file to start from (mmpretrain/weights.py)
    pretrained: str = ""
    act: Literal["gelu", "quick_gelu"] = "gelu"  # quick_gelu: OpenAI's CLIP weights were trained with it
    norm_eps: float = _check(0.0, default=1e-6)  # timm's ViT; CLIP's (OpenAI, open_clip) is 1e-5


def validate(cfg: ImageEncoderConfig, model_cfg) -> None:
    check_heads("model.image", cfg)
    if cfg.image_size % cfg.patch_size:
        raise ConfigError(f"model.image.patch_size: {cfg.patch_size} does not divide model.image.image_size="
                          f"{cfg.image_size}")
    check_normalisation("model.image", cfg.mean, cfg.std)


class ImageEncoder(nn.Module):
    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.width = cfg.width
        self.vit = VisionTransformer(img_size=cfg.image_size, patch_size=cfg.patch_size, num_classes=0,
                                     global_pool="", embed_dim=cfg.width, depth=cfg.depth,
                                     num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, pre_norm=cfg.pre_norm,
                                     patch_drop_rate=cfg.token_dropout, act_layer=cfg.act,
                                     norm_layer=functools.partial(nn.LayerNorm, eps=cfg.norm_eps))
        grid = cfg.image_size // cfg.patch_size
        self.patches = Patches((grid, grid), (cfg.patch_size, cfg.patch_size), 3)
        self.init_clip()  # over the initialisation timm's constructor applied

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's ViT initialisation, then `init: clip`'s over it."""
        self.vit.init_weights()
        self.init_clip()

    @torch.no_grad()
    def init_clip(self) -> None:
        """`init: clip`: open_clip's VisionTransformer initialisation over timm's. open_clip draws no
        weights of its own in the blocks: nn.Linear's default, and nn.MultiheadAttention's Xavier
        input projection."""
        if self.cfg.init != "clip":
            return
        for name, m in self.vit.named_modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
                if name.endswith("attn.qkv"):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
        self.vit.pos_embed.normal_(std=self.cfg.width ** -0.5)
        self.vit.cls_token.normal_(std=self.cfg.width ** -0.5)

    def forward(self, images: torch.Tensor, masked: bool = False):
        """images: (B, 3, S, S) normalised -> tokens (B, 1 + patches, width); `masked`: also the
        kept patches' indices and the pixels' patches (spec.py `ModalitySpec.masked`)."""
        tokens, keep = vit_features(self.vit, images)
        return (tokens, keep, self.patches.split(images)) if masked else tokens


class ImagePreprocess:
    """PIL image -> normalised float tensor (3, S, S).

    Train adds a mild random resized crop whose parameters come from the caller's
    `random.Random`, so augmentation is reproducible per sample without touching
    torch's global RNG (which is slow to reseed and shared with the model). The crop and the
    resize are one Pillow call (`Image.resize(box=...)`, antialiased bilinear: what torchvision's
    `resized_crop` computes on a tensor, to within one grey level, in a quarter of the time on
    small images), and normalisation one fused multiply-add.
    """

    def __init__(self, cfg: ImageEncoderConfig, train: bool):
        self.size, self.train = cfg.image_size, train
        self.scale, self.shift = _normalisation(tuple(cfg.mean), tuple(cfg.std))

    def crop_box(self, w: int, h: int, rng: random.Random) -> tuple[int, int, int, int]:
        area = w * h * rng.uniform(0.85, 1.0)
        aspect = rng.uniform(0.9, 1.1)
        cw = min(w, round((area * aspect) ** 0.5))
        ch = min(h, round((area / aspect) ** 0.5))
        return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        if self.train and rng is not None:
            top, left, ch, cw = self.crop_box(img.width, img.height, rng)
            img = img.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
        else:
            img = TF.center_crop(TF.resize(img, [self.size], antialias=True), [self.size, self.size])
        return torch.addcmul(self.shift, TF.pil_to_tensor(img), self.scale)


@functools.lru_cache(maxsize=8)
def _normalisation(mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / 255 - mean) / std as x * scale + shift, per channel."""
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    return 1 / (255 * std), -mean / std


def open_image(data: bytes, cfg: ImageEncoderConfig) -> Image.Image:
    """Bytes -> RGB image, refusing decompression bombs from the header before decoding pixels."""
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > cfg.max_pixels:
            raise BadSample("image_too_large", f"{w}x{h}")
        return img.convert("RGB")
    except BadSample:
        raise
    except Exception as e:  # PIL raises many types for bad files
        raise BadSample("bad_image", repr(e)) from e


def decode(data: bytes, cfg: ImageEncoderConfig, rng: random.Random | None) -> torch.Tensor:
    return ImagePreprocess(cfg, train=rng is not None)(open_image(data, cfg), rng)


ACCEPTED = ("a path, bytes, a PIL image, uint8 pixels (H, W), (H, W, C) or (C, H, W) with C 1, 3 or 4 (NumPy "
            "or torch), a float tensor already preprocessed (3, S, S), a (B, ...) batch of these or a list")
CHANNELS = (1, 3, 4)  # grey, RGB, RGBA: made RGB as PIL converts them (open_clip's `_convert_to_rgb`)


def preprocess(images, cfg: ImageEncoderConfig) -> torch.Tensor:
    """Downstream inputs -> (B, 3, S, S): one image, a list, or a (B, ...) batch. Paths, bytes, PIL
    images and uint8 pixels get the eval transform (pixels through PIL, as a decoded file), grey,
    RGBA and palette images converted to RGB; float tensors are taken as preprocessed and must be
    (3, S, S)."""
    array = isinstance(images, (torch.Tensor, np.ndarray))
    items = list(images) if isinstance(images, (list, tuple)) or (array and images.ndim == 4) else [images]
    if not items:
        raise ValueError("image inputs: no images given")
    tf = ImagePreprocess(cfg, train=False)
    return torch.stack([_one_image(x, cfg, tf) for x in items])


def _one_image(x, cfg: ImageEncoderConfig, tf: ImagePreprocess) -> torch.Tensor:
    if (data := file_bytes(x)) is not None:
        try:
            x = open_image(data, cfg)
        except BadSample as e:
            raise ValueError(f"image inputs: {file_name(x)}: {e}") from None
    if isinstance(x, Image.Image):
        return tf(x.convert("RGB"))
    x = as_tensor(x, "image", ACCEPTED)
    s = cfg.image_size
    if x.is_floating_point() and x.shape != (3, s, s):
        raise ValueError(f"image inputs: float tensors are taken as preprocessed (normalised), (3, {s}, {s}) "
                         f"each; got {tuple(x.shape)}: pass raw pixels as uint8, a PIL image or a path")
    if x.is_floating_point():
        return x.float()
    if x.ndim == 2:  # grey (H, W)
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"image inputs: one image is (H, W), (H, W, C) or (C, H, W); got {tuple(x.shape)}")
    pixels = channels_first(x, "image", CHANNELS).permute(1, 2, 0).numpy()
    return tf(Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).convert("RGB"))


def media_shape(cfg: ImageEncoderConfig) -> tuple[int, ...]:
    return (3, cfg.image_size, cfg.image_size)


IMAGE = ModalitySpec("image", ImageEncoderConfig, ImageEncoder, ("jpg", "jpeg", "png", "webp"), decode,
                     preprocess, media_shape, validate, blocks=lambda encoder: list(encoder.vit.blocks), masked=True,
                     load_pretrained=lambda encoder, file, key: load_vit(encoder.vit, file, key))
