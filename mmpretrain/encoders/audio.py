"""Audio: decoding (soundfile), clip fitting, and an AST-style encoder.

Log-mel filterbank -> time x frequency patches -> transformer. As in AST, the
spectrogram is treated as a one-channel image, so the patch embedding and
blocks are timm's VisionTransformer with a (mel, frame) input size and a
(frequency, time) patch size.
"""

from __future__ import annotations

import io
import random

import torch
import torch.nn as nn
import torchaudio
import torchaudio.functional as AF
from timm.models.vision_transformer import VisionTransformer

from mmpretrain.config import AudioEncoderConfig
from mmpretrain.encoders.spec import BadSample, ModalitySpec


class LogMel(nn.Module):
    """Waveform (B, samples) -> normalised log-mel (B, 1, n_mels, frames)."""

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.mel = self._mel()
        self.frames = cfg.frames - cfg.frames % cfg.patch_time  # whole time patches (config.validate: >= 1)

    def _mel(self) -> nn.Module:
        cfg = self.cfg
        n_fft = 1 << (cfg.win_samples - 1).bit_length()
        with torch.device("cpu"):  # computed, not learned: real values also in a model built on meta
            return torchaudio.transforms.MelSpectrogram(
                sample_rate=cfg.sample_rate, n_fft=n_fft, win_length=cfg.win_samples, hop_length=cfg.hop_samples,
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
            num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """wave: (B, samples) at cfg.sample_rate -> tokens (B, 1 + patches, width)."""
        return self.vit.forward_features(self.frontend(wave))


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


def decode(data: bytes, cfg: AudioEncoderConfig, rng: random.Random | None) -> torch.Tensor:
    """Any soundfile format, sample rate and channel count -> one mono clip (clip_samples,)."""
    import soundfile as sf  # the shard decoders' dependency, not the model's

    try:
        wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:
        raise BadSample("bad_audio", repr(e)) from e
    if wave.shape[0] == 0:
        raise BadSample("empty_audio")
    shortest = max(cfg.min_seconds, cfg.win_ms / 1000)  # and never less than one spectrogram frame
    if wave.shape[0] < shortest * sr:
        raise BadSample("audio_too_short", f"{wave.shape[0] / sr:.3f} s < {shortest} s")
    return to_clip(torch.from_numpy(wave).mean(dim=1), sr, cfg, rng)


def preprocess(waves: torch.Tensor, cfg: AudioEncoderConfig, sample_rate: int | None = None) -> torch.Tensor:
    """(B, samples) mono waveforms at `sample_rate` (default: the model's) -> (B, clip_samples)."""
    return to_clip(waves, sample_rate or cfg.sample_rate, cfg)


def media_shape(cfg: AudioEncoderConfig) -> tuple[int, ...]:
    return (cfg.clip_samples,)


AUDIO = ModalitySpec("audio", AudioEncoderConfig, AudioEncoder, ("flac", "wav", "mp3", "ogg"), decode,
                     preprocess, media_shape)
