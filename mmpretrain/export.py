"""Exported weights for downstream use (safetensors only, never pickle).

    export/
      config.yaml           resolved config of the run (model, preprocessing, tokenizer)
      model.safetensors     the whole model  -> `load_pretrained(export/)`
      image/ audio/ text/   each tower alone -> `load_encoder(export/image)`
        config.json         the model config it needs, preprocessing included
        model.safetensors
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from mmpretrain.config import Config, ModelConfig, _build, config_from_dict, to_dict
from mmpretrain.data.decode import ImagePreprocess
from mmpretrain.encoders.text import Tokenizer
from mmpretrain.model import MediaTower, MultimodalModel


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def export_model(model: MultimodalModel, cfg: Config, out_dir: Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    save_file(_state(model), out / "model.safetensors")
    model_cfg = to_dict(cfg.model)
    text_state = {f"decoder.{k}": v for k, v in _state(model.decoder).items()}
    text_state.update({f"text_proj.{k}": v for k, v in _state(model.text_proj).items()})
    parts = {m: _state(model.towers[m]) for m in model.modalities} | {"text": text_state}
    for name, state in parts.items():
        (out / name).mkdir(exist_ok=True)
        (out / name / "config.json").write_text(json.dumps({"modality": name, "model": model_cfg}, indent=1))
        save_file(state, out / name / "model.safetensors")
    return out


class Pretrained(nn.Module):
    """A trained model with its preprocessing and tokenizer; every `encode_*` returns (B, E) unit vectors."""

    def __init__(self, model: MultimodalModel, model_cfg: ModelConfig):
        super().__init__()
        self.model = model.eval()
        self.cfg = model_cfg
        self.tokenizer = Tokenizer(model_cfg.text)
        self.preprocess_image = ImagePreprocess(model_cfg.image, train=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        tokens, lengths = self.tokenizer(texts)
        return self.model.encode_text(tokens.to(self.device), lengths.to(self.device))

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor | list[Image.Image]) -> torch.Tensor:
        """Preprocessed (B, 3, S, S) tensors, or PIL images (preprocessed here)."""
        if isinstance(images, list):
            images = torch.stack([self.preprocess_image(im.convert("RGB")) for im in images])
        return self.model.encode_media("image", images.to(self.device))[1]

    @torch.no_grad()
    def encode_audio(self, waves: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        """(B, samples) mono waveforms; resampled and cropped/padded to the training clip."""
        waves = self.preprocess_audio(waves, sample_rate or self.cfg.audio.sample_rate)
        return self.model.encode_media("audio", waves.to(self.device))[1]

    def preprocess_audio(self, waves: torch.Tensor, sample_rate: int) -> torch.Tensor:
        import torchaudio.functional as AF

        a = self.cfg.audio
        if sample_rate != a.sample_rate:
            waves = AF.resample(waves, sample_rate, a.sample_rate)
        n = int(round(a.sample_rate * a.clip_seconds))
        return torch.nn.functional.pad(waves[..., :n], (0, max(0, n - waves.shape[-1])))


def _model_for(model_cfg: ModelConfig, cfg_tree: dict | None = None) -> MultimodalModel:
    media_pairs = (cfg_tree or {}).get("objectives", {}).get("media_pairs", True)
    return MultimodalModel(model_cfg, Tokenizer(model_cfg.text).vocab_size, media_pairs=media_pairs)


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> Pretrained:
    """`load_pretrained("runs/demo/export")` -> a `Pretrained` with encode_text/image/audio."""
    path = Path(path)
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{path}: no model.safetensors here (expected a run's export/ folder)")
    tree = yaml.safe_load((path / "config.yaml").read_text())
    cfg = config_from_dict(tree)
    model = _model_for(cfg.model, tree)
    model.load_state_dict(load_file(path / "model.safetensors"))
    return Pretrained(model, cfg.model).to(device)


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """One tower from `export/<modality>`: a `MediaTower` (image, audio) or, for text,
    a `Pretrained` that only has `encode_text`. Needs no training config."""
    path = Path(path)
    meta = json.loads((path / "config.json").read_text())
    model_cfg = _build(ModelConfig, meta["model"], "model")
    state = load_file(path / "model.safetensors")
    if meta["modality"] == "text":
        model_cfg.modalities = []
        model = MultimodalModel(model_cfg, Tokenizer(model_cfg.text).vocab_size, media_pairs=False)
        model.load_state_dict(state)  # no towers: decoder + text_proj only
        return Pretrained(model, model_cfg).to(device)
    tower = MediaTower(meta["modality"], model_cfg)
    tower.load_state_dict(state)
    tower.preprocess = ImagePreprocess(model_cfg.image, train=False) if meta["modality"] == "image" else None
    return tower.eval().to(device)
