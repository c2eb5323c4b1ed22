"""Typed configuration: one small dataclass per component, nested in `Config`.

A config is a YAML file (read with `yaml.safe_load`) plus dotted overrides
(`train.steps=50 model.decoder.layers=2`). Every value is checked against the
schema when it is read, so a bad config stops before any work starts, naming
the key path, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key, type or value that the schema does not allow."""


def _check(minimum=None, maximum=None, **kwargs):
    """A dataclass field with bounds that `_coerce` enforces."""
    return field(metadata={"min": minimum, "max": maximum}, **kwargs)


@dataclass
class RunConfig:
    name: str = "demo"
    dir: str = "runs"
    seed: int = 0


@dataclass
class DemoCorpusConfig:
    """The built-in corpus, generated once into tar shards (see data/demo.py)."""

    cache_dir: str = "~/.cache/mmpretrain/demo"
    variants_per_concept: int = _check(1, default=16)  # train samples per seen concept
    seed: int = 0


@dataclass
class DataConfig:
    # Shard patterns (brace expansion, e.g. "shards/train-{000..015}.tar"), or
    # "demo" for the built-in corpus's split of the same role.
    sources: list[str] = field(default_factory=lambda: ["demo"])
    eval_sources: list[str] = field(default_factory=lambda: ["demo"])
    # Token budget of one packed decoder row (0: batches of train.batch_size samples). With a
    # budget, a batch holds up to train.batch_size samples and at most this many tokens.
    max_tokens: int = _check(0, default=0)
    shuffle_buffer: int = _check(0, default=1000)
    num_workers: int = _check(0, default=0)
    max_bad_sample_logs: int = _check(0, default=10)  # log at most this many skips per reason
    demo: DemoCorpusConfig = field(default_factory=DemoCorpusConfig)


@dataclass
class ImageEncoderConfig:
    """A timm VisionTransformer and the preprocessing it was trained with."""

    image_size: int = _check(8, default=32)
    patch_size: int = _check(1, default=4)
    width: int = _check(8, default=128)
    depth: int = _check(1, default=4)
    heads: int = _check(1, default=4)
    mlp_ratio: float = _check(1.0, default=4.0)
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    max_pixels: int = _check(1, default=64_000_000)  # decompression-bomb guard


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
    mel_std: float = 4.0

    @property
    def clip_samples(self) -> int:
        """Samples in one clip at sample_rate."""
        return int(round(self.sample_rate * self.clip_seconds))


@dataclass
class TextConfig:
    tokenizer: Literal["openclip"] = "openclip"
    context_length: int = _check(4, 77, default=24)


@dataclass
class FusionConfig:
    num_latents: int = _check(1, default=8)  # decoder tokens per media item
    heads: int = _check(1, default=4)
    embed_dim: int = _check(8, default=128)  # shared contrastive embedding width


@dataclass
class DecoderConfig:
    width: int = _check(8, default=256)
    layers: int = _check(1, default=4)
    heads: int = _check(1, default=4)
    mlp_ratio: float = _check(1.0, default=2.75)  # SwiGLU hidden = ratio * width
    rope_theta: float = _check(1.0, default=10000.0)
    norm_eps: float = _check(0.0, default=1e-5)


@dataclass
class AttentionConfig:
    # auto: SDPA is_causal for one sequence per row; packed rows: xformers where its CUDA
    # kernels load, else torch varlen_attn on CUDA, else SDPA with a padded batch.
    backend: Literal["auto", "xformers", "varlen", "sdpa"] = "auto"


@dataclass
class ModelConfig:
    modalities: list[Literal["image", "audio"]] = field(default_factory=lambda: ["image", "audio"])
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    audio: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)


@dataclass
class ParallelConfig:
    """Applied to the built model from outside (mmpretrain/parallel/)."""

    sp: int = _check(1, default=1)  # Ulysses sequence-parallel group size (divides heads and world)
    activation_checkpointing: Literal["none", "full"] = "none"  # recompute each decoder block


@dataclass
class ObjectivesConfig:
    contrastive_weight: float = _check(0.0, default=1.0)
    next_token_weight: float = _check(0.0, default=0.5)
    media_pairs: bool = True  # also contrast media with media (image<->audio)
    # Captioning costs a vocabulary-wide softmax per caption token; on small machines
    # it can run on the first N samples of each batch (0 = all of them).
    next_token_max_samples: int = _check(0, default=0)
    init_temperature: float = _check(1e-3, 1.0, default=0.07)
    max_logit_scale: float = _check(1.0, default=100.0)


@dataclass
class TrainConfig:
    steps: int = _check(1, default=1000)
    batch_size: int = _check(1, default=128)
    grad_accum: int = _check(1, default=1)
    lr: float = _check(0.0, default=1e-3)
    min_lr_ratio: float = _check(0.0, 1.0, default=0.1)
    warmup_steps: int = _check(0, default=50)
    weight_decay: float = _check(0.0, default=0.05)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    grad_clip: float = _check(0.0, default=1.0)  # 0 disables clipping
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA
    log_every: int = _check(1, default=10)
    eval_every: int = _check(0, default=0)  # 0: evaluate at the end only
    checkpoint_every: int = _check(0, default=200)  # 0: only at the end
    keep_checkpoints: int = _check(1, default=2)
    resume: str = "auto"  # auto | none | path to a checkpoint folder
    nan_policy: Literal["stop", "skip"] = "stop"
    progress: bool = True


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name


# --------------------------------------------------------------------------- loading


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, path: str, meta=None):
    """Check `value` against the annotation `tp` and return it in that type."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, path)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not allowed; expected {_type_name(tp)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise TypeError("unions are not used in the schema")
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    value = tp(value)
    lo, hi = (meta or {}).get("min"), (meta or {}).get("max")
    if lo is not None and value < lo or hi is not None and value > hi:
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ConfigError(f"{path}: {value!r} is out of range; expected a value {bounds}")
    return value


def _build(cls, data: dict, path: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: unknown key{hint} (allowed: {', '.join(fields)})")
        kwargs[key] = _coerce(value, hints[key], where, fields[key].metadata)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value):
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{p}' is a value, not a section")
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`["train.steps=50", "data.sources=[a.tar, b.tar]"]` -> nested dict (values as YAML)."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML config file (optional) and apply dotted overrides."""
    tree: dict = {}
    if path is not None:
        with open(path) as f:
            tree = yaml.safe_load(f) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    tree = _merge(tree, parse_overrides(list(overrides)))
    return _build(Config, tree)


def config_from_dict(tree: dict) -> Config:
    return _build(Config, tree)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
