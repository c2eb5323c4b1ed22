"""Downstream use of an export: `load_pretrained` (every tower) and `load_encoder` (one tower).

Each `encode_*` takes raw inputs, preprocesses them with the same code the
training pipeline uses (the modality's `ModalitySpec.preprocess`) and returns
(B, E) unit vectors. Needs no data pipeline and no training code.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from PIL import Image
from safetensors.torch import load_file

from mmpretrain.config import ModelConfig, _build, config_from_dict
from mmpretrain.encoders import MODALITIES
from mmpretrain.model import MediaTower, MultimodalModel, split_legacy_objectives
from mmpretrain.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class Pretrained(nn.Module):
    """A trained model with its preprocessing and tokenizer; every `encode_*` returns (B, E) unit vectors."""

    def __init__(self, model: MultimodalModel, model_cfg: ModelConfig):
        super().__init__()
        self.model = model.eval()
        self.cfg = model_cfg
        self.tokenizer = Tokenizer(model_cfg.text)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        tokens, lengths = self.tokenizer(texts)
        return self.model.encode_text(tokens.to(self.device), lengths.to(self.device))

    @torch.no_grad()
    def encode(self, modality: str, inputs, **kwargs) -> torch.Tensor:
        """Raw inputs of `modality` (see its spec's `preprocess`) -> (B, E)."""
        x = MODALITIES[modality].preprocess(inputs, getattr(self.cfg, modality), **kwargs)
        return self.model.encode_media(modality, x.to(self.device))[1]

    def encode_image(self, images: torch.Tensor | list[Image.Image]) -> torch.Tensor:
        """Preprocessed (B, 3, S, S) tensors, or PIL images (preprocessed here)."""
        return self.encode("image", images)

    def encode_audio(self, waves: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        """(B, samples) mono waveforms; resampled and cropped/padded to the training clip."""
        return self.encode("audio", waves, sample_rate=sample_rate)

    def encode_video(self, videos) -> torch.Tensor:
        """Video files (paths or bytes; frames sampled as in evaluation), or frames (B, T, 3, H, W)
        uint8 (resized and cropped here), or preprocessed float (B, num_frames, 3, S, S)."""
        return self.encode("video", videos)


def _drop_training_state(state: dict) -> dict:
    """Exports written before 0.2 also held the objectives' temperatures; they are training-only."""
    model, dropped = split_legacy_objectives(state)
    if dropped:
        log.info("ignoring %d training-only tensor(s) in an older export: %s", len(dropped), list(dropped))
    return model


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> Pretrained:
    """`load_pretrained("runs/demo/export")` -> a `Pretrained` with encode_text / encode_<modality>."""
    path = Path(path)
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{path}: no model.safetensors here (expected a run's export/ folder)")
    cfg = config_from_dict(yaml.safe_load((path / "config.yaml").read_text()))
    model = MultimodalModel(cfg.model, Tokenizer(cfg.model.text).vocab_size)
    model.load_state_dict(_drop_training_state(load_file(path / "model.safetensors")))
    return Pretrained(model, cfg.model).to(device)


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """One tower from `export/<modality>`: a `MediaTower` (with `.preprocess(inputs)` for raw inputs)
    or, for text, a `Pretrained` that only has `encode_text`. Needs no training config."""
    path = Path(path)
    meta = json.loads((path / "config.json").read_text())
    model_cfg = _build(ModelConfig, meta["model"], "model")
    state = load_file(path / "model.safetensors")
    if meta["modality"] == "text":
        model_cfg.modalities = []
        model = MultimodalModel(model_cfg, Tokenizer(model_cfg.text).vocab_size)
        model.load_state_dict(state)  # no towers: decoder + text_proj only
        return Pretrained(model, model_cfg).to(device)
    spec = MODALITIES[meta["modality"]]
    tower = MediaTower(spec.name, model_cfg)
    tower.load_state_dict(state)
    section = spec.section(model_cfg)
    tower.preprocess = lambda inputs, **kw: spec.preprocess(inputs, section, **kw)
    return tower.eval().to(device)
