"""Video: the config section, PyAV decoding of only the frames needed, the frame sampler, a
space-time ViT, and a video's own audio track (`data.video_audio`).

Decoding reads the container's stream metadata first (size, duration, rotation)
and refuses what is over `max_pixels` or `max_seconds` before decoding a frame;
then the sampler picks timestamps, the demuxer seeks to the keyframe before the
first one, and frames are decoded only until the last one is passed. The frame
shown at time t is the last frame whose timestamp is <= t, which handles
variable frame rates; times past the end repeat the last frame.

The encoder is a ViT over space-time patches: a tubelet embedding (`tubelet`
frames x patch x patch, a Conv3d), separate spatial and temporal position
embeddings, joint attention over all tokens in timm's `Block`s. It can start
from the image encoder's weights (`init_from_image`: the 2-D patch kernel spread
over the tubelet, temporal embedding at zero), so an image tower's knowledge
carries over to frames.
"""

from __future__ import annotations

import functools
import io
import os
import random
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
from timm.layers import PatchDropout, trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer
from torchvision.transforms.v2 import functional as TF

from mmpretrain.config import ConfigError, _check
from mmpretrain.encoders.spec import (BadSample, ModalitySpec, Patches, as_tensor, channels_first, check_heads,
                                      check_normalisation, drop_tokens, file_bytes, file_name)
from mmpretrain.weights import copy_state, load_vit

THREADED_PIXELS = 640 * 360  # decode frames at least this large with threads


@dataclass
class VideoEncoderConfig:
    """A frame sampler (PyAV decoding of only the span needed) and a space-time ViT."""

    frame_size: int = _check(8, default=32)
    patch_size: int = _check(1, default=8)
    num_frames: int = _check(1, default=8)
    tubelet: int = _check(1, default=2)  # frames per space-time patch
    # segments: the span split into num_frames equal segments, a random frame of each in training,
    # the middle one in evaluation (TSN); fps: num_frames at `fps` from a random (train) or
    # centred (eval) start. Clips shorter than needed repeat their last frame.
    mode: Literal["segments", "fps"] = "segments"
    fps: float = _check(0.1, default=4.0)
    span_seconds: float = _check(0.0, default=0.0)  # segments: 0 = the whole clip
    width: int = _check(8, default=128)
    depth: int = _check(1, default=4)
    heads: int = _check(1, default=4)
    mlp_ratio: float = _check(1.0, default=4.0)
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    max_pixels: int = _check(1, default=8_294_400)  # per frame (4K), read from metadata before decoding
    max_seconds: float = _check(0.1, default=3600.0)  # longer videos are refused before decoding
    init_from_image: bool = False  # start from the image encoder's weights (temporal embedding at 0)
    # an image ViT checkpoint (timm, OpenAI-CLIP / open_clip) inflated into this tower as
    # init_from_image inflates the image tower (the patch kernel spread over the tubelet)
    pretrained: str = ""
    pre_norm: bool = True  # a LayerNorm before the blocks, no patch bias (as model.image.pre_norm)
    # FLIP's token dropout: this fraction of the tubelet tokens dropped at random per sample in
    # training (never in evaluation; the class token always kept), timm's PatchDropout
    token_dropout: float = _check(0.0, below=1.0, default=0.0)


def validate(cfg: VideoEncoderConfig, model_cfg) -> None:
    check_heads("model.video", cfg)
    if cfg.frame_size % cfg.patch_size:
        raise ConfigError(f"model.video.patch_size: {cfg.patch_size} does not divide model.video.frame_size="
                          f"{cfg.frame_size}")
    if cfg.num_frames % cfg.tubelet:
        raise ConfigError(f"model.video.tubelet: {cfg.tubelet} does not divide model.video.num_frames="
                          f"{cfg.num_frames}")
    check_normalisation("model.video", cfg.mean, cfg.std)
    if cfg.init_from_image and cfg.pretrained:
        raise ConfigError("model.video.pretrained: set with model.video.init_from_image; the tower starts from one "
                          "of them (the image tower's weights, or the checkpoint)")
    if cfg.init_from_image:
        i = model_cfg.image
        same = (cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.patch_size, cfg.frame_size, cfg.pre_norm) == \
            (i.width, i.depth, i.heads, i.mlp_ratio, i.patch_size, i.image_size, i.pre_norm)
        if not ("image" in model_cfg.modalities and same):
            raise ConfigError("model.video.init_from_image: needs the image modality with the same width, depth, "
                              "heads, mlp_ratio, patch_size, pre_norm and image_size (= frame_size)")


class VideoEncoder(nn.Module):
    def __init__(self, cfg: VideoEncoderConfig):
        super().__init__()
        self.cfg, self.width = cfg, cfg.width
        p, t = cfg.patch_size, cfg.tubelet
        self.patch_embed = nn.Conv3d(3, cfg.width, kernel_size=(t, p, p), stride=(t, p, p), bias=not cfg.pre_norm)
        grid = (cfg.frame_size // p) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid, cfg.width))  # cls + spatial, as timm's ViT
        self.temporal_embed = nn.Parameter(torch.zeros(1, cfg.num_frames // t, 1, cfg.width))
        self.blocks = nn.Sequential(*[Block(cfg.width, cfg.heads, cfg.mlp_ratio, qkv_bias=True)
                                      for _ in range(cfg.depth)])
        self.norm_pre = nn.LayerNorm(cfg.width, eps=1e-6) if cfg.pre_norm else nn.Identity()  # timm's
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        self.patch_drop = PatchDropout(cfg.token_dropout) if cfg.token_dropout else nn.Identity()  # as timm's ViT
        self.patches = Patches((cfg.num_frames // t, cfg.frame_size // p, cfg.frame_size // p), (t, p, p), 3)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's ViT initialisation (`init_from_image` may overwrite it once the towers exist)."""
        self.temporal_embed.zero_()
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(_init_linear)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed", "temporal_embed"}

    def forward(self, frames: torch.Tensor, masked: bool = False):
        """frames: (B, T, 3, S, S) normalised -> tokens (B, 1 + T/tubelet * patches, width);
        `masked`: also the kept tubelets' indices and the pixels' tubelets (`ModalitySpec.masked`)."""
        x = self.patch_embed(frames.transpose(1, 2))  # (B, C, T', h, w)
        x = x.flatten(3).permute(0, 2, 3, 1)  # (B, T', hw, C)
        x = x + self.pos_embed[:, None, 1:] + self.temporal_embed
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(len(x), -1, -1)
        x, keep = drop_tokens(self.patch_drop, torch.cat([cls, x.flatten(1, 2)], dim=1))
        tokens = self.norm(self.blocks(self.norm_pre(x)))
        return (tokens, keep, self.patches.split(frames.transpose(1, 2))) if masked else tokens

    @torch.no_grad()
    def init_from_image(self, vit: nn.Module) -> None:
        """Copy a timm VisionTransformer of the same geometry (`validate` checks it)."""
        kernel = vit.patch_embed.proj.weight  # (C, 3, p, p) -> spread evenly over the tubelet
        self.patch_embed.weight.copy_(kernel[:, :, None].expand_as(self.patch_embed.weight) / self.cfg.tubelet)
        if self.patch_embed.bias is not None:  # none with pre_norm, on either side (validate)
            self.patch_embed.bias.copy_(vit.patch_embed.proj.bias)
        self.norm_pre.load_state_dict(vit.norm_pre.state_dict())
        self.cls_token.copy_(vit.cls_token)
        self.pos_embed.copy_(vit.pos_embed)
        self.temporal_embed.zero_()
        self.blocks.load_state_dict(vit.blocks.state_dict())
        self.norm.load_state_dict(vit.norm.state_dict())


def load_pretrained(encoder: VideoEncoder, file: str, key: str) -> str:
    """model.video.pretrained: the image checkpoint into a timm ViT of the frames' geometry, then
    inflated (`init_from_image`) into a plain tower whose tensors are copied into this one (which
    FSDP2 may have sharded)."""
    cfg = encoder.cfg
    vit = VisionTransformer(img_size=cfg.frame_size, patch_size=cfg.patch_size, num_classes=0, global_pool="",
                            embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
                            pre_norm=cfg.pre_norm)
    load_vit(vit, file, key)
    plain = VideoEncoder(cfg)
    plain.init_from_image(vit)
    copy_state(encoder, plain.state_dict(), f"{key}: {file}")
    return f"{key}: inflated from {file}"


def init_from(encoder: VideoEncoder, encoders: dict[str, nn.Module]) -> None:
    """Once every tower is built: `init_from_image` copies the image tower."""
    if encoder.cfg.init_from_image:
        encoder.init_from_image(encoders["image"].vit)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):  # timm's ViT initialisation
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------- sampling


def sample_times(duration: float, cfg: VideoEncoderConfig, rng: random.Random | None) -> list[float]:
    """Timestamps (s) of the num_frames frames to show from a clip of `duration` seconds;
    rng: random.Random for training, None for evaluation."""
    n = cfg.num_frames
    if cfg.mode == "segments":
        span = min(cfg.span_seconds, duration) if cfg.span_seconds else duration
        start = rng.uniform(0, duration - span) if rng else (duration - span) / 2
        seg = span / n
        return [start + seg * (i + (rng.random() if rng else 0.5)) for i in range(n)]
    step, need = 1 / cfg.fps, (n - 1) / cfg.fps
    start = rng.uniform(0, max(0.0, duration - need)) if rng else max(0.0, (duration - need) / 2)
    return [start + i * step for i in range(n)]


def _open(data: bytes):
    import av

    try:
        return av.open(io.BytesIO(data), metadata_errors="ignore")
    except Exception as e:  # av raises InvalidDataError and friends for broken files
        raise BadSample("bad_video", repr(e)) from e


def read_frames(container, stream, times: list[float], seek_gap: float = 2.0) -> tuple[list, int]:
    """The frames shown at `times` (sorted) -> (VideoFrames, frames decoded). Seeks to the keyframe
    before times[0], decodes forward, and seeks again when the next time is over `seek_gap`
    seconds ahead (sparse frames from a long clip); no frame after the last time is decoded
    beyond the first one past it."""
    tb, rate = stream.time_base, float(stream.average_rate or 25)
    out, decoded, frames, prev, ahead = [], 0, None, None, None

    def when(frame) -> float:
        return float(frame.pts * tb) if frame.pts is not None and tb else decoded / rate

    for t in times:
        here = ahead if ahead is not None else prev
        if frames is None or (here is not None and t - when(here) > seek_gap):
            if t > 0 and tb:
                container.seek(int(t / tb), stream=stream, backward=True)
            frames, ahead = container.decode(stream), None
        while True:
            if ahead is None:
                ahead = next(frames, None)
                if ahead is None:  # end of stream: the last frame stands for every later time
                    break
                decoded += 1
            if when(ahead) > t + 1e-6:
                break
            prev, ahead = ahead, None
        chosen = prev if prev is not None else ahead
        if chosen is None:
            return [], decoded
        out.append(chosen)
    return out, decoded


def _reformatter():
    """One swscale context per process, reused across frames (`frame.to_ndarray(format=...)` sets
    one up per call, which costs more than decoding a small frame). Per process: swscale runs
    slice threads, which a fork does not copy, so a DataLoader worker that inherited its parent's
    context (the trainer decodes clips for its evaluations) waited forever for them."""
    return _reformatter_of(os.getpid())


@functools.cache
def _reformatter_of(pid: int):
    from av.video.reformatter import VideoReformatter

    return VideoReformatter()


def _rotate(x: torch.Tensor, degrees: int) -> torch.Tensor:
    """(…, H, W) turned by the display rotation a phone wrote into the metadata."""
    return torch.rot90(x, k=round(degrees / 90) % 4, dims=(-2, -1)) if degrees else x


def decode(data: bytes, cfg: VideoEncoderConfig, rng: random.Random | None) -> torch.Tensor:
    """mp4/webm/... bytes -> (num_frames, 3, S, S) normalised frames."""
    with _open(data) as container:
        if not container.streams.video:
            raise BadSample("audio_only" if container.streams.audio else "no_video_stream")
        stream = container.streams.video[0]
        w, h = stream.codec_context.width, stream.codec_context.height
        if w * h > cfg.max_pixels:
            raise BadSample("video_too_large", f"{w}x{h}")
        if w * h >= THREADED_PIXELS:  # frame and slice threads; for small frames starting them costs more
            stream.thread_type = "AUTO"
        duration = (float(stream.duration * stream.time_base) if stream.duration else
                    container.duration / 1e6 if container.duration else 0.0)
        if duration > cfg.max_seconds:
            raise BadSample("video_too_long", f"{duration:.0f} s")
        try:
            frames, _ = read_frames(container, stream, sample_times(duration, cfg, rng))
            rotation = getattr(frames[0], "rotation", 0) if frames else 0
            rgb = _reformatter()
            arrays = {id(f): torch.from_numpy(rgb.reformat(f, format="rgb24").to_ndarray()) for f in frames}
        except Exception as e:  # truncated or corrupt streams fail while decoding
            raise BadSample("bad_video", repr(e)) from e
    if not frames:
        raise BadSample("no_frames")
    x = _rotate(torch.stack([arrays[id(f)] for f in frames]).permute(0, 3, 1, 2), rotation)  # (T, 3, H, W)
    return preprocess_frames(x, cfg, rng)


def preprocess_frames(x: torch.Tensor, cfg: VideoEncoderConfig, rng: random.Random | None = None) -> torch.Tensor:
    """(T, 3, H, W) uint8 -> (T, 3, S, S) normalised; the same crop for every frame (random with rng)."""
    s = cfg.frame_size
    if min(x.shape[-2:]) != s:
        x = TF.resize(x, [s], antialias=True)
    h, w = x.shape[-2:]
    top, left = (rng.randint(0, h - s), rng.randint(0, w - s)) if rng else ((h - s) // 2, (w - s) // 2)
    x = x[..., top : top + s, left : left + s]
    return TF.normalize(TF.to_dtype(x, torch.float32, scale=True), cfg.mean, cfg.std)


def decode_audio_track(data: bytes, audio_cfg, rng: random.Random | None) -> torch.Tensor | None:
    """A video's own audio track -> one clip like any audio (see encoders/audio.py); None when it
    has no audio stream."""
    import av

    from mmpretrain.encoders.audio import to_clip

    with _open(data) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        rate = stream.rate
        to_mono = av.AudioResampler(format="flt", layout="mono", rate=rate)  # any layout and sample format
        try:
            chunks = [r.to_ndarray().reshape(-1) for f in container.decode(stream) for r in to_mono.resample(f)]
        except Exception as e:
            raise BadSample("bad_audio", repr(e)) from e
    if not chunks:
        return None
    return to_clip(torch.from_numpy(np.concatenate(chunks)), rate, audio_cfg, rng)


def audio_track(raw: dict, media: dict, cfg, rng: random.Random | None) -> dict:
    """`data.video_audio`: a sample without an audio member takes its audio from its video's own
    track (AudioSet / VGGSound exports); a video without a track leaves the sample without audio."""
    ext = next((e for e in VIDEO.extensions if e in raw), None)
    if not cfg.data.video_audio or "audio" not in cfg.model.modalities or "audio" in media or ext is None:
        return {}
    track = decode_audio_track(raw[ext], cfg.model.audio, rng)
    return {} if track is None else {"audio": track}


ACCEPTED = ("a path, bytes, uint8 frames (T, 3, H, W) or (T, H, W, 3) (NumPy or torch), float frames already "
            "preprocessed (num_frames, 3, S, S), a (B, ...) batch of these or a list")


def preprocess(videos, cfg: VideoEncoderConfig, fps: float | None = None) -> torch.Tensor:
    """Downstream inputs -> (B, num_frames, 3, S, S): one clip, a list, or a (B, ...) batch. Video
    files (paths or bytes) are sampled as in evaluation; uint8 frames are num_frames frames, or any
    number at `fps` frames per second, sampled as a file would be; float frames are taken as
    preprocessed and must be (num_frames, 3, S, S)."""
    array = isinstance(videos, (torch.Tensor, np.ndarray))
    items = list(videos) if isinstance(videos, (list, tuple)) or (array and videos.ndim == 5) else [videos]
    if not items:
        raise ValueError("video inputs: no videos given")
    return torch.stack([_one_video(x, cfg, fps) for x in items])


def _one_video(x, cfg: VideoEncoderConfig, fps: float | None) -> torch.Tensor:
    if (data := file_bytes(x)) is not None:
        try:
            return decode(data, cfg, None)
        except BadSample as e:
            raise ValueError(f"video inputs: {file_name(x)}: {e}") from None
    x = as_tensor(x, "video", ACCEPTED)
    if x.ndim != 4:
        raise ValueError(f"video inputs: one clip's frames are (T, 3, H, W) or (T, H, W, 3); got "
                         f"{tuple(x.shape)}")
    if x.is_floating_point():
        if tuple(x.shape) != media_shape(cfg):
            raise ValueError(f"video inputs: float frames are taken as preprocessed (normalised), "
                             f"{media_shape(cfg)}; got {tuple(x.shape)}: pass raw frames as uint8")
        return x.float()
    x = channels_first(x, "video")
    if fps:  # frame i is shown from i / fps: the one shown at each time evaluation picks
        x = x[[min(len(x) - 1, int(t * fps + 1e-6)) for t in sample_times(len(x) / fps, cfg, None)]]
    elif len(x) != cfg.num_frames:
        raise ValueError(f"video inputs: {len(x)} frames given and the model takes num_frames="
                         f"{cfg.num_frames}: pass {cfg.num_frames}, or fps= (their frame rate) to sample "
                         f"them as evaluation samples a file, or the file")
    return preprocess_frames(x, cfg)


def media_shape(cfg: VideoEncoderConfig) -> tuple[int, ...]:
    return (cfg.num_frames, 3, cfg.frame_size, cfg.frame_size)


VIDEO = ModalitySpec("video", VideoEncoderConfig, VideoEncoder, ("mp4", "webm", "mkv", "mov", "avi"), decode,
                     preprocess, media_shape, validate, blocks=lambda encoder: list(encoder.blocks),
                     init_from=init_from, extras=audio_track, masked=True, load_pretrained=load_pretrained)
