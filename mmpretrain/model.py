"""The multimodal model: encoders -> fusion -> shared causal decoder.

One decoder pass per batch serves both objectives, on one packed row whose
layout `mmpretrain.packing` owns: caption-only sequences give the text
embeddings (pooled at eot), media+caption sequences and documents give the
next-token logits. The objectives' own state (pairs, temperatures) lives in
`objectives.py`, so a trained model exports as encoders and a text tower.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmpretrain import packing
from mmpretrain.batch import Batch
from mmpretrain.config import Config, ConfigError, ModelConfig
from mmpretrain.decoder import Decoder
from mmpretrain.encoders import MODALITIES
from mmpretrain.fusion import ResamplerFusion


class MediaTower(nn.Module):
    """One modality's encoder and fusion: model input -> decoder tokens and a contrastive embedding."""

    def __init__(self, modality: str, cfg: ModelConfig):
        super().__init__()
        spec = MODALITIES[modality]
        self.encoder = spec.encoder(spec.section(cfg))
        self.fusion = ResamplerFusion(self.encoder.width, cfg.decoder.width, cfg.fusion)

    def init_weights(self) -> None:
        self.fusion.init_weights()
        self.encoder.init_weights()

    def forward(self, x: torch.Tensor, masked: bool = False):
        """-> decoder tokens (B, K, C) and L2-normalised embedding (B, E); `masked`: and the
        encoder's (tokens, kept patch indices or None, input patches) for masked modelling."""
        if not masked:
            tokens, pooled = self.fusion(self.encoder(x))
            return tokens, F.normalize(pooled, dim=-1)
        encoded = self.encoder(x, masked=True)
        tokens, pooled = self.fusion(encoded[0])
        return tokens, F.normalize(pooled, dim=-1), encoded


@dataclass
class ModelOutput:
    embeddings: dict[str, torch.Tensor]  # modality -> (B, E) L2-normalised
    present: dict[str, torch.Tensor]  # modality -> (B,) bool
    lm_hidden: torch.Tensor  # (P, C) decoder output at the positions that predict a next token
    lm_targets: torch.Tensor  # (P,)
    packed_tokens: int = 0  # length of the packed decoder row
    lm_head: torch.Tensor | None = None  # (vocab, C) output embedding: logits = lm_hidden @ lm_head.T
    # modality -> the encoder's (tokens (B, 1 + K, W), kept patch indices (B, K), input patches
    # (B, N, D)), for masked modelling: only the modalities asked for, while tokens are dropped
    masked: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)

    @property
    def lm_logits(self) -> torch.Tensor:
        """(P, vocab) logits, built whole: for inspection; the loss builds them a chunk at a time."""
        return self.lm_hidden @ self.lm_head.t()


class MultimodalModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.modalities = list(cfg.modalities)
        self.towers = nn.ModuleDict({m: MediaTower(m, cfg) for m in self.modalities})
        self.init_from_towers()
        caption_positions = cfg.text.context_length if cfg.text.position_embedding == "learned" else 0
        if cfg.decoder.vocab_size and vocab_size > cfg.decoder.vocab_size:
            raise ConfigError(f"model.decoder.vocab_size: {cfg.decoder.vocab_size} rows of embedding for a "
                              f"tokenizer of {vocab_size} ids; the checkpoint and the tokenizer disagree")
        self.decoder = Decoder(cfg.decoder, cfg.decoder.vocab_size or vocab_size, cfg.attention.backend,
                               caption_positions)
        self.text_proj = nn.Linear(cfg.decoder.width, cfg.fusion.embed_dim, bias=False)

    def init_from_towers(self) -> None:
        """Encoders that start from another tower's weights (video from image) copy them."""
        encoders = {m: tower.encoder for m, tower in self.towers.items()}
        for m, encoder in encoders.items():
            if (init_from := MODALITIES[m].init_from) is not None:
                init_from(encoder, encoders)

    def init_weights(self) -> None:
        """Each part's initialisation beyond PyTorch's `reset_parameters` (see
        `PretrainingTask.init_weights`): the decoder's weights and rotary frequencies, the towers
        from the last to the first (the order in which they have always drawn from the RNG), then
        towers copied from others."""
        self.decoder.init_weights()
        self.decoder.init_buffers()
        for tower in reversed(self.towers.values()):
            tower.init_weights()
        self.init_from_towers()

    @property
    def embed_dim(self) -> int:
        return self.text_proj.out_features

    # ---------------------------------------------------------------- parts
    def parts(self) -> dict[str, list[nn.Module]]:
        """The parts train.freeze and train.lr_scale name (config.model_parts): the decoder, the
        caption embedding's projection, every tower's fusion, each modality's encoder."""
        return {"decoder": [self.decoder], "text_proj": [self.text_proj],
                "fusion": [t.fusion for t in self.towers.values()],
                **{m: [t.encoder] for m, t in self.towers.items()}}

    def freeze(self, names: list[str]) -> None:
        """No gradients for these parts (so no optimizer state), and eval mode from now on."""
        self.frozen = [module for name in names for module in self.parts()[name]]
        for module in self.frozen:
            module.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for module in getattr(self, "frozen", []):  # frozen parts stay in eval mode (no dropout)
            module.eval()
        return self

    # ---------------------------------------------------------------- encoders
    def end_token_dropout(self) -> None:
        """Every media tower keeps all its tokens from now on (train.token_dropout_until)."""
        from timm.layers import PatchDropout

        for m in self.modules():
            if isinstance(m, PatchDropout):
                m.prob = 0.0

    def encode_media(self, modality: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> decoder tokens (B, K, C) and normalised embedding (B, E). (An entry point of its own
        under FSDP2, which gathers the model's parameters around it: `forward` calls the towers.)"""
        return self.towers[modality](x)

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Caption alone through the decoder, pooled at eot: (B, L) -> (B, E) normalised."""
        _, seqs = self._caption_only(tokens, lengths)
        x, row, _, _ = packing.pack(seqs)
        return self._text_embedding(self.decoder(x, row), row, len(tokens))

    def _caption_only(self, tokens: torch.Tensor, lengths: torch.Tensor):
        """-> caption embeddings (B, L, C), and one caption-only sequence per sample."""
        text = self.decoder.embed_caption(tokens)
        return text, [packing.caption_only(text[i, :n]) for i, n in enumerate(lengths.tolist())]

    def _text_embedding(self, h: torch.Tensor, row: packing.Packing, n: int) -> torch.Tensor:
        return F.normalize(self.text_proj(h[packing.caption_ends(row, n)]), dim=-1)

    # ---------------------------------------------------------------- forward
    def forward(self, batch: Batch, layout: packing.RowLayout, masked: tuple[str, ...] = ()) -> ModelOutput:
        """The batch as one packed row laid out by `layout` (see mmpretrain.packing); `masked`:
        the modalities whose encoder outputs masked modelling reconstructs from."""
        b = len(batch.keys)
        embeddings, media_tokens, encoded = {}, {}, {}
        for m in self.modalities:  # every tower runs, on an empty batch too (documents only), so
            # that every rank's backward reaches the same parameters and collectives (DDP, FSDP)
            media_tokens[m], embeddings[m], *rest = self.towers[m](batch.media[m], masked=m in masked)
            if rest and rest[0][1] is not None:  # tokens were dropped (not in the unmasked phase)
                encoded[m] = rest[0]
        text, seqs = self._caption_only(batch.tokens, batch.lengths)
        for i, n in enumerate(batch.lengths.tolist()):
            if layout.captions(i):
                media = [media_tokens[m][i] for m in self.modalities if batch.present[m][i]]
                seqs.append(packing.media_caption(media, text[i, :n], batch.tokens[i, :n]))
        seqs += self._documents(batch.documents)
        x, row, idx, targets = packing.pack(seqs)
        h = self.decoder(x, row)
        embeddings["text"] = self._text_embedding(h, row, b)
        present = {"text": torch.ones(b, dtype=torch.bool, device=h.device), **batch.present}
        return ModelOutput(embeddings, present, h[idx], targets, len(x), self.decoder.output_weight, encoded)

    def _documents(self, documents) -> list[list[packing.Piece]]:
        """Interleaved documents: text embedded here, each modality's items encoded in one batch."""
        items = {m: [v for doc in documents for k, v in doc if k == m] for m in self.modalities}
        tokens = {m: iter(self.towers[m](torch.stack(v))[0]) for m, v in items.items() if v}
        return [packing.document([(self.decoder.embed(v), v) if kind == "text" else (next(tokens[kind]), None)
                                  for kind, v in doc]) for doc in documents]


ADAMW_BYTES = 16  # per fp32 parameter: the weight, its gradient and AdamW's two moments


def parameter_count(cfg: ModelConfig, vocab_size: int) -> int | None:
    """The model's parameters, counted on the meta device (nothing is allocated); None when a
    single tensor would be past what torch can address (2^63 bytes)."""
    try:
        with torch.device("meta"):
            return sum(p.numel() for p in MultimodalModel(cfg, vocab_size).parameters())
    except RuntimeError as e:
        if "overflow" not in str(e):  # "Storage size calculation overflowed"
            raise
        return None


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory of `device`: the GPU's, or this machine's RAM; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(cfg: Config, vocab_size: int, device: torch.device, world_size: int = 1) -> None:
    """Refuse, before the model is built, sizes whose weights, gradients and AdamW state alone
    exceed the device's memory (a lower bound: activations come on top); FSDP2 splits them over
    the `world_size` processes."""
    shards = world_size if cfg.parallel.dp_shard == "fsdp" else 1
    memory, n = device_memory(device), parameter_count(cfg.model, vocab_size)
    need = (2**63 if n is None else n * ADAMW_BYTES) / shards
    if memory is None or need <= memory:
        return
    what = (f"a tensor past torch's 2^63-byte limit: over {need / 1e9:,.0f} GB" if n is None else
            f"{n:,} parameters need {need / 1e9:,.1f} GB for weights, gradients and AdamW state")
    per = f" per process (FSDP2 over {shards})" if shards > 1 else ""
    where = "this machine" if device.type == "cpu" else f"the GPU ({device})"
    advice = _what_made_it_large(cfg.model, vocab_size, n) or "reduce the model's sizes"
    raise ConfigError(f"model: {what}{per}, more than the {memory / 1e9:,.1f} GB of memory of {where}; {advice}")


def _what_made_it_large(cfg: ModelConfig, vocab_size: int, n: int | None, tries: int = 3) -> str:
    """The size setting (model.<section>.<key>) whose default shrinks the model most, as a clause
    naming it; "" when none does. `n`: the model's parameters (None: past what torch addresses).
    The settings furthest from their defaults are tried first, each counted on the meta device,
    until one brings the model to a tenth of its size."""
    def size(count: int | None) -> float:
        return math.inf if count is None else count

    sections = ["decoder", "fusion", "text", *cfg.modalities]
    candidates = sorted((c for name in sections for c in _changed_numbers(getattr(cfg, name), name)),
                        key=lambda c: -abs(math.log((abs(c[1]) + 1) / (abs(c[2]) + 1))))
    found, least = None, size(n)
    for key, value, default in candidates[:tries]:
        trial = copy.deepcopy(cfg)
        *parents, leaf = key.split(".")
        setattr(functools.reduce(getattr, parents, trial), leaf, default)
        try:
            smaller = size(parameter_count(trial, vocab_size))
        except Exception:  # noqa: BLE001 - its default does not fit the other settings: no answer from it
            continue
        if smaller < least:
            found, least = (key, value, default), smaller
            if smaller * 10 <= size(n):
                break
    if found is None:
        return ""
    key, value, default = found
    return (f"model.{key}={value} makes it this large (at its default, {default}, the model has {least:,} "
            f"parameters); reduce it")


def _changed_numbers(section, prefix: str):
    """(key path, value, default) of a config section's numbers (its subsections' too) that are
    not their defaults."""
    defaults = type(section)()
    for f in dataclasses.fields(section):
        value, default = getattr(section, f.name), getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            yield from _changed_numbers(value, f"{prefix}.{f.name}")
        elif type(value) in (int, float) and value != default:
            yield f"{prefix}.{f.name}", value, default
