"""Audio: the config section, decoding (soundfile), clip fitting, and an AST-style encoder.

Log-mel filterbank -> time x frequency patches -> transformer. As in AST, the
spectrogram is treated as a one-channel image, so the patch embedding and
blocks are timm's VisionTransformer with a (mel, frame) input size and a
(frequency, time) patch size.
"""

from __future__ import annotations

import functools
import io
import os
import random
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torchaudio
import torchaudio.functional as AF
from timm.models.vision_transformer import VisionTransformer

from mmpretrain.config import ConfigError, _check
from mmpretrain.encoders.spec import (BadSample, ModalitySpec, Patches, as_tensor, check_heads, file_bytes, file_name,
                                      vit_features)
from mmpretrain.weights import load_vit


@dataclass
class AudioEncoderConfig:
    """An AST-style spectrogram transformer and its log-mel front end."""

    sample_rate: int = _check(1000, default=16000)
    clip_seconds: float = _check(0.1, default=1.0)
    n_mels: int = _check(8, default=64)
    win_ms: float = _check(1.0, default=25.0)
    hop_ms: float = _check(1.0, default=10.0)
    patch_freq: int = _check(1, default=8)
    patch_time: int = _check(1, default=10)
    width: int = _check(8, default=128)
    depth: int = _check(1, default=4)
    heads: int = _check(1, default=4)
    mlp_ratio: float = _check(1.0, default=4.0)
    # log-mel normalisation (AST normalises with data-set statistics)
    mel_mean: float = -4.0
    mel_std: float = _check(1e-6, default=4.0)
    min_seconds: float = _check(0.0, default=0.1)  # shorter clips are skipped as audio_too_short
    # FLIP's token dropout: this fraction of the spectrogram-patch tokens dropped at random per sample in
    # training (never in evaluation; the class token always kept), timm's PatchDropout
    token_dropout: float = _check(0.0, below=1.0, default=0.0)
    # an image ViT checkpoint (timm, OpenAI-CLIP / open_clip) to start from, the AST way: the patch
    # kernel averaged over the colour channels and resized, positions resampled to the spectrogram
    pretrained: str = ""
    # the ViT's variant, as model.image's (CLIP weights: pre_norm true, norm_eps 1e-5, quick_gelu for OpenAI's)
    pre_norm: bool = False
    act: Literal["gelu", "quick_gelu"] = "gelu"
    norm_eps: float = _check(0.0, default=1e-6)

    @property
    def clip_samples(self) -> int:
        """Samples in one clip at sample_rate."""
        return int(round(self.sample_rate * self.clip_seconds))

    @property
    def win_samples(self) -> int:
        return int(self.sample_rate * self.win_ms / 1000)

    @property
    def hop_samples(self) -> int:
        return int(self.sample_rate * self.hop_ms / 1000)

    @property
    def n_fft(self) -> int:
        """The FFT's size: the window's samples rounded up to a power of two."""
        return 1 << (self.win_samples - 1).bit_length()

    @property
    def frames(self) -> int:
        """Spectrogram frames of one clip (center=True framing); needs hop_samples >= 1."""
        return self.clip_samples // self.hop_samples + 1


def validate(cfg: AudioEncoderConfig, model_cfg) -> None:
    check_heads("model.audio", cfg)
    if cfg.n_mels % cfg.patch_freq:
        raise ConfigError(f"model.audio.patch_freq: {cfg.patch_freq} does not divide model.audio.n_mels="
                          f"{cfg.n_mels}")
    if cfg.hop_samples < 1 or cfg.win_samples < 1:
        raise ConfigError(f"model.audio.hop_ms/win_ms: {cfg.hop_ms}/{cfg.win_ms} ms is under one sample at "
                          f"{cfg.sample_rate} Hz")
    if cfg.frames < cfg.patch_time:
        raise ConfigError(f"model.audio.clip_seconds: {cfg.clip_seconds} s gives {cfg.frames} frames, fewer "
                          f"than one time patch (patch_time={cfg.patch_time})")
    fft = f"the {cfg.n_fft}-point FFT of model.audio.win_ms={cfg.win_ms} at {cfg.sample_rate} Hz"
    if cfg.n_fft // 2 >= cfg.clip_samples:  # the STFT pads each side by half its size, mirroring the clip
        raise ConfigError(f"model.audio.win_ms: {fft} is longer than twice the {cfg.clip_samples}-sample clip "
                          f"(model.audio.clip_seconds={cfg.clip_seconds}); expected a shorter window or a longer clip")
    if cfg.n_mels > cfg.n_fft // 2 + 1:
        raise ConfigError(f"model.audio.n_mels: {cfg.n_mels} is more than the {cfg.n_fft // 2 + 1} frequency bins "
                          f"of {fft} (the bands past them are empty); expected at most {cfg.n_fft // 2 + 1}, or "
                          f"a longer window")


class LogMel(nn.Module):
    """Waveform (B, samples) -> normalised log-mel (B, 1, n_mels, frames)."""

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.mel = self._mel()
        self.frames = cfg.frames - cfg.frames % cfg.patch_time  # whole time patches (validate: >= 1)

    def _mel(self) -> nn.Module:
        cfg = self.cfg
        with torch.device("cpu"):  # computed, not learned: real values also in a model built on meta
            return torchaudio.transforms.MelSpectrogram(
                sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, win_length=cfg.win_samples, hop_length=cfg.hop_samples,
                n_mels=cfg.n_mels, power=2.0)

    @torch.no_grad()
    def init_buffers(self) -> None:
        """The window and filterbank again, after a model built on the meta device is allocated."""
        for mine, fresh in zip(self.mel.buffers(), self._mel().buffers()):
            mine.copy_(fresh)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if not len(wave):  # an empty batch (a documents-only rank), which the STFT refuses
            return wave.new_zeros(0, 1, self.cfg.n_mels, self.frames)
        with torch.autocast(wave.device.type, enabled=False):  # the FFT wants fp32
            spec = self.mel(wave.float())[..., : self.frames]
            spec = (torch.log(spec + 1e-6) - self.cfg.mel_mean) / self.cfg.mel_std
        return spec[:, None]


class AudioEncoder(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.width = cfg.width
        self.frontend = LogMel(cfg)
        self.vit = VisionTransformer(
            img_size=(cfg.n_mels, self.frontend.frames), patch_size=(cfg.patch_freq, cfg.patch_time),
            in_chans=1, num_classes=0, global_pool="", embed_dim=cfg.width, depth=cfg.depth,
            num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, patch_drop_rate=cfg.token_dropout, pre_norm=cfg.pre_norm,
            act_layer=cfg.act, norm_layer=functools.partial(nn.LayerNorm, eps=cfg.norm_eps))
        grid = (cfg.n_mels // cfg.patch_freq, self.frontend.frames // cfg.patch_time)
        self.patches = Patches(grid, (cfg.patch_freq, cfg.patch_time), 1, normalise=False)  # AudioMAE's targets

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's ViT initialisation, and the front end's filterbank."""
        self.vit.init_weights()
        self.frontend.init_buffers()

    def forward(self, wave: torch.Tensor, masked: bool = False):
        """wave: (B, samples) at cfg.sample_rate -> tokens (B, 1 + patches, width); `masked`: also
        the kept patches' indices and the log-mel spectrogram's patches (`ModalitySpec.masked`)."""
        spec = self.frontend(wave)
        tokens, keep = vit_features(self.vit, spec)
        return (tokens, keep, self.patches.split(spec)) if masked else tokens


def to_clip(wave: torch.Tensor, sample_rate: int, cfg: AudioEncoderConfig,
            rng: random.Random | None = None) -> torch.Tensor:
    """(..., samples) mono at `sample_rate` -> (..., cfg.clip_samples) at cfg.sample_rate: resampled,
    cropped (at a random start with rng, else from the start) and zero-padded."""
    if sample_rate != cfg.sample_rate:
        wave = AF.resample(wave, sample_rate, cfg.sample_rate)
    n = cfg.clip_samples
    if wave.shape[-1] > n:
        start = rng.randint(0, wave.shape[-1] - n) if rng else 0
        wave = wave[..., start : start + n]
    return torch.nn.functional.pad(wave, (0, n - wave.shape[-1]))


def read_audio(data: bytes) -> tuple[torch.Tensor, int]:
    """Any soundfile format, sample rate and channel count -> (mono (samples,), sample rate)."""
    import soundfile as sf  # the shard decoders' dependency, not the model's

    try:
        wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:
        raise BadSample("bad_audio", repr(e)) from e
    if wave.shape[0] == 0:
        raise BadSample("empty_audio")
    return torch.from_numpy(wave).mean(dim=1), sr


def decode(data: bytes, cfg: AudioEncoderConfig, rng: random.Random | None) -> torch.Tensor:
    """Shard member bytes -> one mono clip (clip_samples,)."""
    wave, sr = read_audio(data)
    shortest = max(cfg.min_seconds, cfg.win_ms / 1000)  # and never less than one spectrogram frame
    if len(wave) < shortest * sr:
        raise BadSample("audio_too_short", f"{len(wave) / sr:.3f} s < {shortest} s")
    return to_clip(wave, sr, cfg, rng)


ACCEPTED = ("a path, bytes, a float waveform (N,), (B, N) or (B, C, N) (NumPy or torch), or a list of paths, "
            "bytes or clips (N,) / (C, N)")


def preprocess(waves, cfg: AudioEncoderConfig, sample_rate: int | None = None) -> torch.Tensor:
    """Downstream inputs -> (B, clip_samples) at the model's rate: audio files (their own rate), or
    float waveforms recorded at `sample_rate` (required for them: never assumed) as one clip (N,),
    a batch (B, N) or (B, C, N), or a list of clips (N,) / (C, N). Channels are averaged to mono;
    each clip is resampled, then cropped from the start or zero-padded."""
    if isinstance(waves, (list, tuple)):
        items = list(waves)
    elif isinstance(waves, (str, os.PathLike, bytes)):
        items = [waves]
    else:
        waves = as_tensor(waves, "audio", ACCEPTED)
        if waves.ndim not in (1, 2, 3):
            raise ValueError(f"audio inputs: a waveform is (N,), (B, N) or (B, C, N); got {waves.ndim}-D "
                             f"{tuple(waves.shape)}")
        items = [waves] if waves.ndim == 1 else list(waves)
    if not items:
        raise ValueError("audio inputs: no clips given")
    return torch.stack([_one_clip(x, cfg, sample_rate) for x in items])


def _one_clip(x, cfg: AudioEncoderConfig, sample_rate: int | None) -> torch.Tensor:
    if (data := file_bytes(x)) is not None:
        try:
            wave, rate = read_audio(data)
        except BadSample as e:
            raise ValueError(f"audio inputs: {file_name(x)}: {e}") from None
        if sample_rate not in (None, rate):
            raise ValueError(f"audio inputs: {file_name(x)} is at {rate} Hz, not sample_rate={sample_rate}; "
                             f"files carry their rate (leave sample_rate out)")
    else:
        wave, rate = as_tensor(x, "audio", ACCEPTED), sample_rate
        if not wave.is_floating_point():
            raise ValueError(f"audio inputs: float waveforms in [-1, 1] are expected; got "
                             f"{str(wave.dtype).removeprefix('torch.')} (16-bit PCM: divide by 32768)")
        if wave.ndim not in (1, 2):
            raise ValueError(f"audio inputs: one clip is (N,) or (C, N); got {tuple(wave.shape)}")
        if rate is None:
            raise ValueError(f"audio inputs: sample_rate= is required with waveforms: the rate they were "
                             f"recorded at (this model's is {cfg.sample_rate} Hz; others are resampled)")
        wave = wave.float().mean(dim=0) if wave.ndim == 2 else wave.float()  # (C, N) -> mono
    if len(wave) < rate * cfg.win_ms / 1000:
        raise ValueError(f"audio inputs: a clip of {len(wave)} samples is shorter than one spectrogram "
                         f"window ({cfg.win_ms} ms at {rate} Hz); a (samples, channels) array, as soundfile "
                         f"reads one, is one clip as wave.T[None]")
    return to_clip(wave, rate, cfg)


def media_shape(cfg: AudioEncoderConfig) -> tuple[int, ...]:
    return (cfg.clip_samples,)


AUDIO = ModalitySpec("audio", AudioEncoderConfig, AudioEncoder, ("flac", "wav", "mp3", "ogg"), decode,
                     preprocess, media_shape, validate, blocks=lambda encoder: list(encoder.vit.blocks), masked=True,
                     load_pretrained=lambda encoder, file, key: load_vit(encoder.vit, file, key))
