"""Decoding raw WebDataset samples (bytes by extension) into tensors.

Only known extensions are read; nothing is ever unpickled from a shard.
Every failure raises `BadSample` with a short reason that the pipeline counts.
"""

from __future__ import annotations

import io
import random

import soundfile as sf
import torch
import torchaudio.functional as AF
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from mmpretrain.config import AudioEncoderConfig, ImageEncoderConfig

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
AUDIO_EXTS = ("flac", "wav", "mp3", "ogg")
TEXT_EXTS = ("txt",)
DOC_KEY = "doc.json"  # marks an interleaved document (see SampleDecoder.document)


class BadSample(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def first_key(sample: dict, exts: tuple[str, ...]) -> str | None:
    return next((e for e in exts if e in sample), None)


class ImagePreprocess:
    """PIL image -> normalised float tensor (3, S, S).

    Train adds a mild random resized crop whose parameters come from the caller's
    `random.Random`, so augmentation is reproducible per sample without touching
    torch's global RNG (which is slow to reseed and shared with the model).
    """

    def __init__(self, cfg: ImageEncoderConfig, train: bool):
        self.size, self.train = cfg.image_size, train
        self.mean, self.std = cfg.mean, cfg.std

    def crop_box(self, w: int, h: int, rng: random.Random) -> tuple[int, int, int, int]:
        area = w * h * rng.uniform(0.85, 1.0)
        aspect = rng.uniform(0.9, 1.1)
        cw = min(w, round((area * aspect) ** 0.5))
        ch = min(h, round((area / aspect) ** 0.5))
        return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        x = TF.pil_to_tensor(img)
        if self.train and rng is not None:
            x = TF.resized_crop(x, *self.crop_box(img.width, img.height, rng), [self.size, self.size],
                                antialias=True)
        else:
            x = TF.center_crop(TF.resize(x, [self.size], antialias=True), [self.size, self.size])
        return TF.normalize(TF.to_dtype(x, torch.float32, scale=True), self.mean, self.std)


def decode_image(data: bytes, cfg: ImageEncoderConfig) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size  # header only: refuse decompression bombs before decoding pixels
        if w * h > cfg.max_pixels:
            raise BadSample("image_too_large", f"{w}x{h}")
        return img.convert("RGB")
    except BadSample:
        raise
    except Exception as e:  # PIL raises many types for bad files
        raise BadSample("bad_image", repr(e)) from e


def decode_audio(data: bytes, cfg: AudioEncoderConfig, rng: random.Random | None) -> torch.Tensor:
    """Bytes -> mono float waveform at cfg.sample_rate, cropped (random if rng) or padded."""
    try:
        wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:
        raise BadSample("bad_audio", repr(e)) from e
    if wave.shape[0] == 0:
        raise BadSample("empty_audio")
    wave = torch.from_numpy(wave).mean(dim=1)  # (samples,) mono
    if sr != cfg.sample_rate:
        wave = AF.resample(wave, sr, cfg.sample_rate)
    n = int(round(cfg.sample_rate * cfg.clip_seconds))
    if wave.numel() > n:
        start = rng.randint(0, wave.numel() - n) if rng else 0
        wave = wave[start : start + n]
    return torch.nn.functional.pad(wave, (0, n - wave.numel()))


def decode_captions(data: bytes) -> list[str]:
    """A `.txt` member -> its captions, one per line (CLIP_benchmark's webdataset layout for
    retrieval sets, which writes a caption's own newlines as a literal backslash-n)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadSample("bad_text", repr(e)) from e
    captions = [line.replace("\\n", " ").strip() for line in text.splitlines()]
    captions = [c for c in captions if c]
    if not captions:
        raise BadSample("empty_text")
    return captions
