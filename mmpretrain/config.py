"""Typed configuration: one small dataclass per component, nested in `Config`.

A config is a YAML file (read with `yaml.safe_load`) plus dotted overrides
(`train.steps=100 model.decoder.layers=2`). Every value is checked against the
schema when it is read, so a bad config stops before any work starts, naming
the key path, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import string
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key, type or value that the schema does not allow."""


def _check(minimum=None, maximum=None, below=None, **kwargs):
    """A dataclass field with bounds that `_coerce` enforces (`below`: an exclusive maximum)."""
    return field(metadata={"min": minimum, "max": maximum, "below": below}, **kwargs)


def _nonempty(default: str):
    """A string field that must not be empty (a folder or a name)."""
    return field(default=default, metadata={"nonempty": True})


@dataclass
class RunConfig:
    name: str = _nonempty("demo")
    dir: str = _nonempty("runs")
    seed: int = _check(-2**63, 2**63 - 1, default=0)  # torch's generators take 64 bits (seed + rank)


@dataclass
class DemoCorpusConfig:
    """The built-in corpus, generated once into tar shards (see data/demo.py)."""

    cache_dir: str = _nonempty("~/.cache/mmpretrain/demo")
    variants_per_concept: int = _check(1, default=16)  # train samples per seen concept
    seed: int = 0


@dataclass
class SourceConfig:
    """One training source: shards, its share of the mix, and the name metrics use for it."""

    SHORTHAND = "pattern"  # a bare string in the YAML stands for {pattern: <string>}
    pattern: str = _nonempty("demo")
    weight: float = _check(0.0, default=1.0)  # relative; the stream draws sources in these proportions
    name: str = ""  # default: the pattern
    # a uid list (keep.txt of `python -m mmpretrain.data.curate`, or a .npy of keys): train on those
    # samples of the shards only, a curated subset without new shards
    keep: str = ""

    @property
    def label(self) -> str:
        return self.name or self.pattern


@dataclass
class DataConfig:
    # Shard patterns (brace expansion, e.g. "shards/train-{000..015}.tar"), or "demo" for the
    # built-in corpus's split of the same role. Training sources may be weighted and named:
    # [{pattern: "laion/{000..999}.tar", weight: 0.7, name: laion}, "cc12m/{000..099}.tar"]
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    eval_sources: list[str] = field(default_factory=lambda: ["demo"])
    # Token budget of one packed decoder row (0: batches of train.batch_size samples). With a
    # budget, a batch holds up to train.batch_size samples and at most this many tokens.
    max_tokens: int = _check(0, default=0)
    shuffle_buffer: int = _check(0, default=1000)
    num_workers: int = _check(-1, default=-1)  # DataLoader workers per process; -1: auto (0 on CPU)
    max_bad_sample_logs: int = _check(0, default=10)  # log at most this many skips per reason
    # Where a sample's captions are, in order of preference: a member extension ("txt", "caption")
    # or a JSON member's field ("json:caption"); a field may hold a string or a list of strings.
    # The default covers img2dataset, LAION-CLAP / LAION-audio-630k and WebVid exports.
    caption_keys: list[str] = field(default_factory=lambda: ["txt", "caption", "json:caption", "json:text"])
    # A sample without an audio member takes its audio from its video's own track (AudioSet /
    # VGGSound exports); a video without a track leaves the sample without audio.
    video_audio: bool = False
    # false: epochs (every sample once per epoch, the same number of batches on every rank);
    # true: an endless stream drawing shards with replacement (webdataset's resampled mode)
    resampled: bool = False
    demo: DemoCorpusConfig = field(default_factory=DemoCorpusConfig)


@dataclass
class TextConfig:
    # openclip: open_clip's CLIP BPE (77 tokens at most); hf:<folder>: a Hugging Face tokenizer
    # (its tokenizer.json, with BOS / EOS / pad as its tokenizer_config.json or config.json name them)
    tokenizer: str = _nonempty("openclip")
    context_length: int = _check(4, default=24)
    # learned: each caption token also gets a learned embedding of its place in the caption (CLIP's
    # text tower), on top of the decoder's rotary positions; none: rotary only. Learned positions
    # rescued the relations benchmark while the image tower had timm's initialisation, are level
    # with rotary alone since it has CLIP's, and slowed the video demo by half (benchmarks/RESULTS.md).
    # Documents' text has rotary positions only.
    position_embedding: Literal["learned", "none"] = "none"


@dataclass
class FusionConfig:
    num_latents: int = _check(1, default=8)  # decoder tokens per media item
    heads: int = _check(1, default=4)
    embed_dim: int = _check(8, default=128)  # shared contrastive embedding width
    # what the contrastive embedding is pooled from: the mean of the resampler's latents, the
    # encoder's class token (CLIP), or an attention pool of its own (one learned query, SigLIP's MAP)
    embed_pool: Literal["latents", "cls", "attention"] = "latents"


@dataclass
class RopeScalingConfig:
    """Llama 3's rotary frequency scaling (Hugging Face's rope_type "llama3"): wavelengths past
    original_max_position_embeddings / low_freq_factor divided by `factor`, those under
    original / high_freq_factor kept, a smooth blend between."""

    rope_type: Literal["none", "llama3"] = "none"
    factor: float = _check(1.0, default=8.0)
    low_freq_factor: float = _check(0.0, default=1.0)
    high_freq_factor: float = _check(0.0, default=4.0)
    original_max_position_embeddings: int = _check(1, default=8192)


@dataclass
class MoEConfig:
    """Mixture-of-experts MLPs in the decoder (mmpretrain/moe.py): `experts` SwiGLU experts in every
    `every`-th block (0 experts: dense), each token routed to `top_k` of them by a router in fp32.
    Load balancing: `bias` (auxiliary-loss-free, DeepSeek-V3: a per-expert bias added to the scores
    for choosing only, moved by `bias_rate` towards even load after every optimizer step, outside
    autograd), `aux` (Switch Transformer's loss, weight `aux_weight`), or `none`. No capacity limit:
    no token is dropped. Expert parallelism is not built: every rank holds (its FSDP2 shard of) all
    experts."""

    experts: int = _check(0, default=0)
    top_k: int = _check(1, default=2)
    every: int = _check(1, default=1)  # blocks every-1, 2*every-1, ... are MoE (1: all)
    hidden: int = _check(0, default=0)  # each expert's SwiGLU hidden width; 0: the dense MLP's
    balance: Literal["bias", "aux", "none"] = "bias"
    bias_rate: float = _check(0.0, default=1e-3)
    aux_weight: float = _check(0.0, default=1e-2)


@dataclass
class DecoderConfig:
    width: int = _check(8, default=256)
    layers: int = _check(1, default=4)
    heads: int = _check(1, default=4)
    mlp_ratio: float = _check(1.0, default=2.75)  # SwiGLU hidden = ratio * width
    rope_theta: float = _check(1.0, default=10000.0)
    norm_eps: float = _check(0.0, default=1e-5)
    # The Llama family's other fields (a checkpoint's config.json sets them, model.decoder.pretrained):
    kv_heads: int = _check(0, default=0)  # grouped-query attention's key/value heads; 0: `heads`
    head_dim: int = _check(0, default=0)  # 0: width / heads
    mlp_hidden: int = _check(0, default=0)  # SwiGLU hidden width; 0: from mlp_ratio
    qkv_bias: bool = False  # Qwen2's q/k/v biases
    tie_embeddings: bool = True  # the output head is the token embedding
    vocab_size: int = _check(0, default=0)  # rows of the embedding; 0: the tokenizer's vocabulary
    rope_scaling: RopeScalingConfig = field(default_factory=lambda: RopeScalingConfig())
    # a Hugging Face Llama-family checkpoint folder (config.json + *.safetensors, local: nothing is
    # downloaded): the decoder's fields come from its config.json and its weights are loaded
    pretrained: str = ""
    moe: MoEConfig = field(default_factory=lambda: MoEConfig())

    @property
    def head_width(self) -> int:
        return self.head_dim or self.width // self.heads

    @property
    def key_value_heads(self) -> int:
        return self.kv_heads or self.heads


@dataclass
class AttentionConfig:
    # auto: SDPA is_causal for one sequence per row; packed rows: xformers where its CUDA
    # kernels load, else torch varlen_attn on CUDA, else SDPA with a padded batch. auto never
    # picks flex for now. Its measured rule (one H100, benchmarks/RESULTS.md), once `pytest -m
    # cuda` (tests/test_cuda.py, run by benchmarks/gpu_check.py) has passed flex on a GPU: flex for
    # packed rows on CUDA whose documents average 256 tokens or more, where it beat varlen
    # (benchmarks/attention_gpu.py re-measures).
    backend: Literal["auto", "xformers", "varlen", "flex", "sdpa"] = "auto"


def _modalities() -> dict:
    """The registered modalities: name -> ModalitySpec (mmpretrain.encoders.MODALITIES)."""
    from mmpretrain.encoders import MODALITIES  # here: the modalities' config sections import this module

    return MODALITIES


@dataclass
class ModelConfig:
    """`modalities`: names of registered modalities (mmpretrain.encoders). `sections`: one per
    registered modality, its spec's config dataclass (encoders/<name>.py), read and written in place
    of this field as model.image, model.audio, ... and read as attributes (cfg.model.image)."""

    modalities: list[str] = field(default_factory=lambda: ["image", "audio"])
    sections: dict[str, Any] = field(default_factory=lambda: {m: s.config() for m, s in _modalities().items()})
    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)

    def __getattr__(self, name: str):
        sections = self.__dict__.get("sections", {})
        if name not in sections:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return sections[name]


@dataclass
class ParallelConfig:
    """Applied to the built model from outside (mmpretrain/parallel/)."""

    sp: int = _check(1, default=1)  # Ulysses sequence-parallel group size (divides heads and world)
    # ring attention (context parallelism) degree: with sp, sp x cp processes share each packed
    # row (Ulysses within groups of sp, the ring across them); sp x cp divides the world
    cp: int = _check(1, default=1)
    # tensor parallelism of the decoder (parallel/tensor.py): its projections split over tp
    # processes, innermost in the mesh (dp x sp x tp); divides the heads and key/value heads
    tp: int = _check(1, default=1)
    # ddp: every process holds the whole model; fsdp: FSDP2 shards parameters, gradients and
    # optimizer state over the processes (the model is built on the meta device, then allocated)
    dp_shard: Literal["ddp", "fsdp"] = "ddp"
    # full: recompute each decoder block; selective: keep matmul/attention outputs, recompute the rest
    # offload: full, with each block's saved input in host memory until backward (longest sequences)
    activation_checkpointing: Literal["none", "full", "selective", "offload"] = "none"
    tiled_mlp: int = _check(0, default=0)  # >0: decoder MLPs run over tiles of this many tokens
    # torch.compile per block (decoder, encoder blocks, fusion). auto is off for now. Its rule, once
    # `pytest -m cuda` test_tiny_training_compiled_on_cuda (tests/test_cuda.py, run by
    # benchmarks/gpu_check.py) has passed on a GPU: on for CUDA with parallel.sp=1 (Ulysses'
    # collectives break graphs), off on CPU. Until then the compiled path is checked on CPU only.
    compile: Literal["auto", "on", "off"] = "auto"


@dataclass
class DistillConfig:
    """Distillation from a frozen teacher (objectives/distill.py): an mmpretrain run, export or checkpoint folder; an
    open_clip checkpoint file with `open_clip_model` naming its architecture; or "offline": the
    teacher's embeddings stored in the shards (python -m mmpretrain.data.teacher_embed)."""

    teacher: str = ""  # "": none
    weight: float = _check(0.0, default=1.0)
    # Hinton's distillation temperature: both similarity matrices' logits divided by it (softer
    # targets: the teacher's ranking beyond its top pick), the loss times its square. 1 is
    # open_clip's DistillClipLoss; 4 gave the demo's student +0.077 R@1 where 1 gave nothing
    # (benchmarks/RESULTS.md)
    temperature: float = _check(1e-3, default=4.0)
    # an open_clip model name (ViT-B-32, ...) or a model config JSON file: `teacher` is then a local
    # checkpoint of it (nothing is downloaded); the teacher embeds text and images
    open_clip_model: str = ""


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
    # infonce: CLIP's softmax over the global batch; siglip: the sigmoid loss over every pair, its
    # blocks exchanged between ranks by a bidirectional P2P ring or one all-gather, the logits
    # recomputed in backward `siglip_chunk` columns at a time (0: a rank's whole batch)
    contrastive: Literal["infonce", "siglip"] = "infonce"
    siglip_exchange: Literal["ring", "gather"] = "ring"
    siglip_chunk: int = _check(0, default=0)
    siglip_init_temperature: float = _check(1e-3, 1.0, default=0.1)
    siglip_init_bias: float = -10.0
    distill: DistillConfig = field(default_factory=DistillConfig)
    # masked modelling (MAE): a light decoder per media tower with token dropout reconstructs the
    # dropped patches (pixels normalised per patch; log-mel for audio) from the kept tokens'
    # encoder outputs; the loss counts the dropped patches only (objectives/masked.py)
    masked_weight: float = _check(0.0, default=0.0)
    masked_decoder_width: int = _check(8, default=64)
    masked_decoder_depth: int = _check(1, default=1)
    masked_decoder_heads: int = _check(1, default=4)


@dataclass
class TrainConfig:
    steps: int = _check(1, default=1000)
    batch_size: int = _check(1, default=128)
    grad_accum: int = _check(1, default=1)
    lr: float = _check(0.0, default=1e-3)
    min_lr_ratio: float = _check(0.0, 1.0, default=0.1)
    # the linear warm-up: a number of steps, or a share of train.steps (a float between 0 and 1:
    # 0.375 is 150 of 400 steps, 22 of 60), which `validate` turns into steps; 0.05: 50 of 1000
    warmup_steps: float = _check(0.0, default=0.05)
    weight_decay: float = _check(0.0, default=0.05)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # two values in [0, 1)
    grad_clip: float = _check(0.0, default=1.0)  # 0 disables clipping
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA
    log_every: int = _check(1, default=10)
    eval_every: int = _check(0, default=0)  # 0: evaluate at the end only
    checkpoint_every: int = _check(0, default=200)  # 0: only at the end
    keep_checkpoints: int = _check(1, default=2)
    # write periodic checkpoints in the background (torch.distributed.checkpoint.async_save): the
    # step waits only for the copy to host memory; a checkpoint counts once its write completes
    async_checkpoint: bool = False
    resume: str = _nonempty("auto")  # auto | none | path to a checkpoint folder
    # A checkpoint's data position belongs to its data.sources; resuming on other sources is refused
    # (keep), or with reset starts them afresh, keeping weights, optimizer, schedule and step (a
    # checkpoint of these same sources resumes its data as usual, so reset can stay on a command)
    resume_data: Literal["keep", "reset"] = "keep"
    # Continued pretraining: start a new run from the weights of an export folder or a checkpoint
    # folder (fresh optimizer and schedule); "" starts from scratch. A resumable checkpoint of this
    # run takes precedence, so an interrupted continued run resumes as usual.
    init_from: str = ""
    # token dropout (model.<modality>.token_dropout) from step 1 up to this step, none after it
    # (FLIP's unmasked tuning at the end); 0: the whole run
    token_dropout_until: int = _check(0, default=0)
    # parts kept as they are (no gradients, no optimizer state, eval mode): decoder, text_proj (the
    # caption embedding's projection), fusion (every tower's), or a modality's encoder (image, ...)
    freeze: list[str] = field(default_factory=list)
    # a learning-rate factor per part (the same names): {decoder: 0.1}; the rest at train.lr
    lr_scale: dict[str, float] = _check(0.0, default_factory=dict)
    nan_policy: Literal["stop", "skip"] = "stop"
    progress: bool = True


@dataclass
class LogConfig:
    # Weights & Biases besides TensorBoard (the `wandb` extra): every number of metrics.jsonl and of
    # the evaluations, from the main process; WANDB_MODE=offline writes it into the run folder
    wandb: bool = False
    wandb_project: str = _nonempty("mmpretrain")
    # the device's peak dense TFLOP/s at the training precision, for `mfu` in the metrics (the
    # model's TFLOP/s per device are logged regardless); 0: known CUDA devices' bf16 peak, else no mfu
    peak_tflops: float = _check(0.0, default=0.0)


@dataclass
class EvalSetConfig:
    """One named eval set (mmpretrain/eval/sets.py)."""

    name: str = _nonempty("set")  # its records: eval/<name>.json, eval/history.jsonl, tb/eval/<name>/
    # retrieval: R@1/5/10 on shards of media-caption samples; classification: zero-shot, and
    # linear_probe: a logistic-regression head on frozen train/ embeddings, on a folder in
    # CLIP_benchmark's layout (classnames.txt, zeroshot_classification_templates.txt, test/, train/)
    kind: Literal["retrieval", "classification", "linear_probe"] = "classification"
    path: str = _nonempty("data/set")  # retrieval: shard patterns (brace expansion) or a demo corpus' name
    # retrieval: only the directions with this modality; classification: its samples must be of it;
    # "": any of the model's
    modality: str = ""
    split: str = "test"  # classification, linear_probe: the split reported
    every: int = _check(0, default=0)  # steps between evaluations; 0: train.eval_every


@dataclass
class EvalConfig:
    # Sets evaluated besides the retrieval on data.eval_sources (named "retrieval") and the built-in
    # demo corpora's classification sets (when one is among data.eval_sources): each every its
    # `every` steps (0: train.eval_every) and at the end, split across the data-parallel ranks.
    sets: list[EvalSetConfig] = field(default_factory=list)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

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
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, path: str, meta=None):
    """Check `value` against the annotation `tp` and return it in that type."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and hasattr(tp, "SHORTHAND"):
            value = {tp.SHORTHAND: value}
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, path)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not allowed; expected {_type_name(tp)}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, dict)) and (item is str or hasattr(item, "SHORTHAND")):
            value = [value]  # a single pattern where a list is expected
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_type, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping ({{name: value, ...}}), got {value!r}")
        return {_coerce(k, key_type, f"{path} key"): _coerce(v, item, f"{path}.{k}", meta) for k, v in value.items()}
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
    meta = meta or {}
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{path}: {value!r} is not allowed; expected a finite number")
    if meta.get("nonempty") and not value.strip():
        raise ConfigError(f"{path}: must not be empty")
    lo, hi, below = meta.get("min"), meta.get("max"), meta.get("below")
    if lo is not None and value < lo or hi is not None and value > hi or below is not None and value >= below:
        bounds = (f"between {lo} and {hi}" if hi is not None else f">= {lo} and < {below}" if below is not None
                  else f">= {lo}")
        raise ConfigError(f"{path}: {value!r} is out of range; expected a value {bounds}")
    return value


def _schema(cls) -> dict[str, Any]:
    """A dataclass's keys -> their types, in order. A ModelConfig's follow the registered
    modalities: `modalities` takes their names, and their sections are keys of their own in the
    place of `sections` (model.image, model.audio, ...)."""
    hints = typing.get_type_hints(cls)
    schema = {}
    for f in dataclasses.fields(cls):
        if cls is ModelConfig and f.name == "modalities":
            schema[f.name] = list[Literal[tuple(_modalities())]]
        elif cls is ModelConfig and f.name == "sections":
            schema.update({m: spec.config for m, spec in _modalities().items()})
        else:
            schema[f.name] = hints[f.name]
    return schema


def _build(cls, data: dict, path: str = ""):
    schema = _schema(cls)
    metadata = {f.name: f.metadata for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in schema:
            close = difflib.get_close_matches(str(key), schema, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: unknown key{hint} (allowed: {', '.join(schema)})")
        kwargs[key] = _coerce(value, schema[key], where, metadata.get(key))
    if cls is ModelConfig:  # every registered modality's section: as given, else its defaults
        kwargs["sections"] = {m: kwargs.pop(m) if m in kwargs else spec.config()
                              for m, spec in _modalities().items()}
    return cls(**kwargs)


class _Loader(yaml.SafeLoader):
    """yaml.safe_load, plus: 1e-4 is a number (YAML 1.1 wants 1.0e-4), duplicate keys are errors,
    and only true/false are booleans (YAML 1.2): YAML 1.1 reads `on`/`off`/`yes`/`no` as booleans,
    which would turn `parallel.compile=on` into True."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def _yaml(text: str, where: str):
    """Parse YAML text; a syntax error becomes a ConfigError naming `where`, line and column."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        pos = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{where}{pos}: not valid YAML ({e.problem})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({e})") from None


def _override_value(key: str, raw: str):
    """An override's value as YAML; a [list] whose items YAML cannot read in flow style (brace
    patterns: [/data/train-{000..127}.tar]) is split on commas."""
    if not raw.strip():
        return ""
    try:
        return _yaml(raw, f"override {key}")
    except ConfigError:
        text = raw.strip()
        if text.startswith("[") and text.endswith("]") and "{" in text:
            return [item.strip().strip("'\"") for item in text[1:-1].split(",") if item.strip()]
        raise


def _set_dotted(tree: dict, dotted: str, value):
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{p}' is a value, not a section")
    node[leaf] = value


def _brace_pattern(words: list[str]) -> str | None:
    """The brace pattern bash expands into `words` (`a-{000..127}.tar`, `{laion,cc12m}.tar`) when
    they look like its expansion: a common prefix or suffix, not only digits, around differing parts."""
    prefix = os.path.commonprefix(words)
    suffix = os.path.commonprefix([w[len(prefix):][::-1] for w in words])[::-1]
    middles = [w[len(prefix):len(w) - len(suffix)] for w in words]
    if all(m.isdigit() for m in middles):  # whole numbers: {000..009}, not 00{0..9}
        head, tail = prefix.rstrip(string.digits), suffix.lstrip(string.digits)
        middles = [prefix[len(head):] + m + suffix[:len(suffix) - len(tail)] for m in middles]
        prefix, suffix = head, tail
    if not (prefix + suffix).strip(string.digits) or len(set(middles)) < len(middles):
        return None
    if all(m.isdigit() for m in middles):  # a range: equal steps, all zero-padded alike or none
        n = [int(m) for m in middles]
        step = n[1] - n[0]
        padding = len({len(m) for m in middles}) == 1 or all(str(k) == m for k, m in zip(n, middles))
        if step and padding and all(b - a == step for a, b in zip(n, n[1:])):
            by = f"..{abs(step)}" if abs(step) > 1 else ""
            return f"{prefix}{{{middles[0]}..{middles[-1]}{by}}}{suffix}"
    return f"{prefix}{{{','.join(middles)}}}{suffix}"


def _repeated(key: str, given: list[tuple[int, str]]) -> str:
    """The error for a key given more than once: (argument index, value) each time. Adjacent values
    that one unquoted brace pattern would expand to are shown as that pattern, quoted."""
    values = [v for _, v in given]
    shown = ", ".join(values) if len(values) <= 3 else f"{values[0]}, {values[1]} ... {values[-1]}"
    message = f"{key}: given {len(values)} times ({shown})"
    adjacent = [i for i, _ in given] == list(range(given[0][0], given[0][0] + len(given)))
    if adjacent and (pattern := _brace_pattern(values)):
        return (f"{message}, which is what the shell makes of an unquoted brace pattern; "
                f"quote it: {key}='{pattern}'")
    return f"{message}; give each key once"


def parse_overrides(overrides: list[str]) -> dict:
    """`["train.steps=50", "data.sources=[a.tar, b.tar]"]` -> nested dict (values as YAML). A key
    given twice is an error (the shell's expansion of an unquoted brace pattern, often)."""
    given: dict[str, list[tuple[int, str]]] = {}
    for i, item in enumerate(overrides):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        if "" in key.split("."):
            raise ConfigError(f"override {item!r}: an empty key in the path {key!r}; expected key.path=value "
                              f"(e.g. train.steps=5)")
        given.setdefault(key, []).append((i, raw))
    tree: dict = {}
    for key, values in given.items():
        if len(values) > 1:
            raise ConfigError(_repeated(key, values))
        _set_dotted(tree, key, _override_value(key, values[0][1]))
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_text(path: Path) -> str:
    """A config file's text; a folder or a file that is not UTF-8 text is a ConfigError."""
    if path.is_dir():
        raise ConfigError(f"{path}: a directory; expected a YAML file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} on line {line}); "
                          f"expected a YAML file") from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML config file (optional) and apply dotted overrides."""
    tree: dict = {}
    if path is not None:
        tree = _yaml(_read_text(Path(path)), str(path))
        if tree is None:  # an empty file: the defaults
            tree = {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {tree!r}")
    given = parse_overrides(list(overrides))
    return validate(_build(Config, _merge(tree, given)), given)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config, given: dict | None = None) -> Config:
    """Checks across fields: what the modules would assert later (geometry, divisibility), here,
    with the key path, the value and what is allowed. `given`: the overrides (as a tree), which a
    pretrained decoder's config.json must agree with (it replaces the config file's values)."""
    m = cfg.model
    moe = m.decoder.moe
    _require(not (moe.experts and m.decoder.pretrained),
             f"model.decoder.moe.experts: {moe.experts} with model.decoder.pretrained: a dense checkpoint has no "
             f"experts to load; set moe.experts=0 or train the decoder from scratch")
    _require(moe.experts != 1, "model.decoder.moe.experts: 1 is a dense MLP with a router; expected 0 or at least 2")
    _require(not moe.experts or moe.top_k <= moe.experts,
             f"model.decoder.moe.top_k: {moe.top_k} is more than moe.experts={moe.experts}")
    if m.decoder.pretrained:  # the decoder's fields from the checkpoint's config.json
        from mmpretrain.hf import decoder_config

        m.decoder = decoder_config(m.decoder, (given or {}).get("model", {}).get("decoder", {}))
    _require(len(m.modalities) > 0, "model.modalities: [] has no media modality; expected at least one")
    dup = sorted({x for x in m.modalities if m.modalities.count(x) > 1})
    _require(not dup, f"model.modalities: {m.modalities} lists {dup} twice; each modality once")
    for name in m.modalities:  # its own checks (encoders/<name>.py), then the fusion's over its width
        section = m.sections[name]
        _modalities()[name].validate(section, m)
        _require(section.width % m.fusion.heads == 0,
                 f"model.fusion.heads: {m.fusion.heads} does not divide model.{name}.width={section.width}")
    d = m.decoder
    _require((d.head_dim or d.width % d.heads == 0) and d.head_width % 2 == 0,
             f"model.decoder.heads: {d.heads} does not split model.decoder.width={d.width} into heads of "
             f"even size (rotary embeddings rotate pairs)")
    _require(d.heads % d.key_value_heads == 0,
             f"model.decoder.kv_heads: {d.kv_heads} does not divide model.decoder.heads={d.heads}")
    _require(d.heads % cfg.parallel.sp == 0,
             f"parallel.sp: {cfg.parallel.sp} does not divide model.decoder.heads={d.heads}")
    par = cfg.parallel
    _require(d.heads % par.tp == 0 and d.key_value_heads % par.tp == 0,
             f"parallel.tp: {par.tp} does not divide model.decoder.heads={d.heads} and its key/value heads "
             f"({d.key_value_heads})")
    _require(d.heads // par.tp % par.sp == 0, f"parallel.sp: {par.sp} does not divide the {d.heads // par.tp} "
                                               f"heads each of parallel.tp={par.tp} ranks holds")
    o = cfg.objectives
    _require(o.contrastive_weight > 0 or o.next_token_weight > 0 or o.masked_weight > 0,
             "objectives: contrastive_weight, next_token_weight and masked_weight are all 0; nothing would train")
    _validate_masked(cfg)
    t = cfg.train
    parts = model_parts(m)
    for key, names in (("train.freeze", t.freeze), ("train.lr_scale", list(t.lr_scale))):
        unknown = [n for n in names if n not in parts]
        _require(not unknown, f"{key}: {unknown} are not parts of this model; expected some of {parts}")
    _require(set(parts) - set(t.freeze) - {"text_proj"}, f"train.freeze: {t.freeze} freezes every part; "
                                                         f"nothing would train")
    _require(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas),
             f"train.betas: {t.betas}; expected two values in [0, 1)")
    t.warmup_steps = _warmup_steps(t)
    _require(t.warmup_steps < t.steps,
             f"train.warmup_steps: {t.warmup_steps} is not below train.steps={t.steps}: the run would end in "
             f"its warm-up, before the learning rate decays; expected a value below {t.steps} (0: no warm-up) "
             f"or a share of the run (0.375: {int(0.375 * t.steps)} of {t.steps} steps)")
    _validate_tokenizer(m.text)
    one_pair = 2 * m.text.context_length + len(m.modalities) * m.fusion.num_latents
    _require(not cfg.data.max_tokens or cfg.data.max_tokens >= one_pair,
             f"data.max_tokens: {cfg.data.max_tokens} is below one sample (up to {one_pair} tokens: the caption "
             f"twice and {m.fusion.num_latents} tokens per modality); expected 0 or >= {one_pair}")
    _require(bool(cfg.data.sources), "data.sources: [] names no shards")
    _require(sum(s.weight for s in cfg.data.sources) > 0, "data.sources: every weight is 0")
    labels = [s.label for s in cfg.data.sources]
    _require(len(set(labels)) == len(labels), f"data.sources: two sources are named alike ({labels}); give them "
             f"distinct names")
    _require(bool(cfg.data.eval_sources), "data.eval_sources: [] names no shards")
    names = ["retrieval"] + [s.name for s in cfg.eval.sets]
    _require(len(set(names)) == len(names), f"eval.sets: two sets are named alike ({names}, \"retrieval\" is "
             f"data.eval_sources'); give them distinct names")
    for i, s in enumerate(cfg.eval.sets):
        _require(s.modality in ("", *m.modalities), f"eval.sets[{i}].modality: {s.modality!r} is not one of "
                 f"model.modalities {m.modalities} (or \"\": any)")
        _require(re.fullmatch(r"[\w.+-]+", s.name) is not None, f"eval.sets[{i}].name: {s.name!r}; expected "
                 f"letters, digits, '_', '.', '+', '-' (it names files)")
    _require(all(k and (not k.startswith("json:") or k[5:]) for k in cfg.data.caption_keys) and
             bool(cfg.data.caption_keys), f"data.caption_keys: {cfg.data.caption_keys}; expected extensions "
                                          f"('txt') or JSON fields ('json:caption')")
    return cfg


def _warmup_steps(t: TrainConfig) -> int:
    """train.warmup_steps in steps: a share of train.steps (between 0 and 1) rounded down, or a
    whole number of steps."""
    w = t.warmup_steps
    if 0 < w < 1:
        return int(Fraction(str(w)) * t.steps)  # the share as written: 0.29 of 100 is 29, not 28.999...
    _require(w == int(w), f"train.warmup_steps: {w}; expected a number of steps (an integer) or a share of "
                          f"train.steps between 0 and 1 (0.375: 150 of 400 steps)")
    return int(w)


def model_parts(model_cfg: ModelConfig) -> list[str]:
    """What train.freeze and train.lr_scale name (model.MultimodalModel.parts)."""
    return ["decoder", "text_proj", "fusion", *model_cfg.modalities]


def _validate_tokenizer(text: TextConfig) -> None:
    if text.tokenizer == "openclip":
        _require(text.context_length <= 77, f"model.text.context_length: {text.context_length} is past open_clip's "
                                            f"tokenizer's 77 tokens; expected 77 or fewer")
        return
    _require(text.tokenizer.startswith("hf:") and len(text.tokenizer) > 3,
             f"model.text.tokenizer: {text.tokenizer!r}; expected openclip or hf:<folder> (a Hugging Face "
             f"tokenizer folder with tokenizer.json)")
    folder = Path(text.tokenizer[3:]).expanduser()
    _require((folder / "tokenizer.json").is_file(), f"model.text.tokenizer: {folder} has no tokenizer.json")


def masked_modalities(model_cfg: ModelConfig) -> list[str]:
    """The modalities that masked modelling reconstructs: those with token dropout whose spec
    supports it."""
    return [m for m in model_cfg.modalities if _modalities()[m].masked
            and getattr(model_cfg.sections[m], "token_dropout", 0.0) > 0]


def _validate_masked(cfg: Config) -> None:
    o = cfg.objectives
    if not o.masked_weight:
        return
    _require(o.masked_decoder_width % o.masked_decoder_heads == 0,
             f"objectives.masked_decoder_heads: {o.masked_decoder_heads} does not divide "
             f"objectives.masked_decoder_width={o.masked_decoder_width}")
    able = [m for m in cfg.model.modalities if _modalities()[m].masked]
    _require(bool(masked_modalities(cfg.model)),
             f"objectives.masked_weight: {o.masked_weight} needs token dropout to mask with: set "
             f"model.<modality>.token_dropout (e.g. 0.75, MAE's) for one of {able or 'no modality in use'}"
             f"{'' if able else ' (model.modalities has none that masked modelling can reconstruct)'}")


def config_from_dict(tree: dict) -> Config:
    return _build(Config, tree)


def to_dict(cfg):
    """A config, or any of its values, as plain data as YAML holds it: a ModelConfig's sections in
    the place of `sections` (model.image, model.audio, ...)."""
    if isinstance(cfg, list):
        return [to_dict(v) for v in cfg]
    if not dataclasses.is_dataclass(cfg):
        return cfg
    out = {}
    for f in dataclasses.fields(cfg):
        if isinstance(cfg, ModelConfig) and f.name == "sections":
            out.update({m: to_dict(section) for m, section in cfg.sections.items()})
        else:
            out[f.name] = to_dict(getattr(cfg, f.name))
    return out


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
