"""Downstream use of a trained model: `load_pretrained` (every tower; a run folder, its export/ or
a checkpoint, named as every CLI names a model: `find_model`) and `load_encoder` (one tower).

Each `encode_*` takes raw inputs (one or a list: paths, PIL images, arrays, tensors; see the
modality's `preprocess` in `encoders/`), preprocesses them with the same code the training
pipeline uses and returns (B, E) unit vectors; `similarity` turns two sets of them into CLIP's
scaled logits with the temperature training learned. Needs no data pipeline and no training code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from safetensors.torch import load_file

from mmpretrain.config import Config, ModelConfig, _build, config_from_dict, load_config
from mmpretrain.encoders import MODALITIES
from mmpretrain.model import MediaTower, MultimodalModel
from mmpretrain.model_folder import ModelNotFound, ModelPath, find_model
from mmpretrain.tokenizer import Tokenizer


class Pretrained(nn.Module):
    """A trained model with its preprocessing and tokenizer; every `encode_*` returns (B, E) unit
    vectors. `objectives`: the objectives' learned tensors (`logit_scale.<pair>`), for `similarity`."""

    def __init__(self, model: MultimodalModel, model_cfg: ModelConfig, objectives: dict | None = None):
        super().__init__()
        self.model = model.eval()
        self.cfg = model_cfg
        self.tokenizer = Tokenizer(model_cfg.text)
        # pair -> exp(log(1/T)); None: none given (load_encoder's text tower)
        self.logit_scale = None if objectives is None else {
            k.removeprefix("logit_scale."): float(v.exp())
            for k, v in objectives.items() if k.startswith("logit_scale.")}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode_text(self, texts: str | list[str]) -> torch.Tensor:
        """One caption or a list -> (B, E)."""
        tokens, lengths = self.tokenizer([texts] if isinstance(texts, str) else texts)
        return self.model.encode_text(tokens.to(self.device), lengths.to(self.device))

    @torch.no_grad()
    def encode(self, modality: str, inputs, **kwargs) -> torch.Tensor:
        """Raw inputs of `modality` (see its spec's `preprocess`) -> (B, E)."""
        if modality not in self.model.modalities:  # before decoding: the inputs are not what is wrong
            raise ValueError(f"encode_{modality}: this model has no {modality} tower (its towers: "
                             f"{', '.join(['text', *self.model.modalities])})")
        x = MODALITIES[modality].preprocess(inputs, getattr(self.cfg, modality), **kwargs)
        return self.model.encode_media(modality, x.to(self.device))[1]

    def encode_image(self, images) -> torch.Tensor:
        """One image or a list: paths, bytes, PIL images, uint8 pixels (H, W, 3) or (3, H, W)
        (NumPy or torch; (B, ...) for a batch), or float tensors already preprocessed (B, 3, S, S)."""
        return self.encode("image", images)

    def encode_audio(self, waves, sample_rate: int | None = None) -> torch.Tensor:
        """Audio files (paths or bytes; their own rate), or float waveforms, NumPy or torch: one clip
        (N,), a batch (B, N) or (B, C, N), or a list of clips (N,) / (C, N), recorded at
        `sample_rate` (required: never assumed). Channels are averaged; resampled and cropped /
        padded to the training clip."""
        return self.encode("audio", waves, sample_rate=sample_rate)

    def encode_video(self, videos, fps: float | None = None) -> torch.Tensor:
        """Video files (paths or bytes; frames sampled as in evaluation), or uint8 frames
        (T, 3, H, W) or (T, H, W, 3), one clip, a (B, ...) batch or a list: num_frames of them, or
        any number at `fps` (then sampled as evaluation samples a file); or float frames already
        preprocessed (B, num_frames, 3, S, S)."""
        return self.encode("video", videos, fps=fps)

    @torch.no_grad()
    def similarity(self, a: torch.Tensor, b: torch.Tensor, pair: str, probs: bool = False) -> torch.Tensor:
        """CLIP's scaled logits between embeddings from `encode_*`: (Na, E) and (Nb, E) -> (Na, Nb)
        = exp(logit_scale) * a @ b.T, with the temperature training learned for `pair` ("image-text":
        a holds images, b texts; either order names the same temperature). probs: each row's
        softmax over b (zero-shot classification: a the images, b one prompt per class)."""
        if self.logit_scale is None:
            raise RuntimeError("similarity: this model has no learned temperatures (load_pretrained gives "
                               "them); use a @ b.T for uncalibrated cosine similarity")
        x, _, y = pair.partition("-")
        scale = self.logit_scale.get(f"{x}-{y}", self.logit_scale.get(f"{y}-{x}"))
        if scale is None:
            raise ValueError(f"similarity: pair: {pair!r} has no learned temperature; this model's pairs: "
                             f"{', '.join(self.logit_scale)} (either order)")
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
            raise ValueError(f"similarity: expected embeddings (Na, E) and (Nb, E) from encode_*; got "
                             f"{tuple(a.shape)} and {tuple(b.shape)}")
        logits = scale * a @ b.T
        return logits.softmax(dim=-1) if probs else logits


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> Pretrained:
    """`load_pretrained("runs/demo")` (or its export/, or a checkpoint folder: `find_model`) -> a
    `Pretrained` with encode_text / encode_<modality> and similarity."""
    return open_model(path, device)[0]


def open_model(path: str | Path, device: str | torch.device = "cpu",
               what: str = "load_pretrained") -> tuple[Pretrained, Config, ModelPath]:
    """`load_pretrained`, with the run's whole config and where the model was found."""
    where = find_model(path, what)
    if where.checkpoint:
        from mmpretrain.checkpoint import read_tensors  # torch.distributed.checkpoint: only for a checkpoint

        cfg, task = load_config(where.config), read_tensors(where.folder, prefix="task.")
        weights, objectives = _under(task, "model."), _under(task, "objectives.")
    else:
        if not (where.folder / "objectives.safetensors").exists():
            raise ModelNotFound(f"{what} {where.folder}: no objectives.safetensors here (an export/ folder has it)")
        tree = yaml.safe_load(where.config.read_text())
        _tokenizer_in(tree.get("model", {}), where.folder)
        cfg = config_from_dict(tree)
        weights = load_file(where.folder / "model.safetensors")
        objectives = load_file(where.folder / "objectives.safetensors")
    model = MultimodalModel(cfg.model, Tokenizer(cfg.model.text).vocab_size)
    model.load_state_dict(weights)
    return Pretrained(model, cfg.model, objectives).to(device), cfg, where


def _under(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """One tower from `export/<modality>`: a `MediaTower` (with `.preprocess(inputs)` for raw inputs)
    or, for text, a `Pretrained` that only has `encode_text`. Needs no training config."""
    path = Path(path)
    meta = json.loads((path / "config.json").read_text())
    _tokenizer_in(meta["model"], path.parent)
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


def _tokenizer_in(model_tree: dict, export: Path) -> None:
    """An export's Hugging Face tokenizer (hf:tokenizer, relative to the export's folder) as a
    path that reads from anywhere."""
    text = model_tree.get("text", {})
    name = text.get("tokenizer", "openclip")
    if name.startswith("hf:") and not Path(name[3:]).expanduser().is_absolute():
        text["tokenizer"] = f"hf:{export / name[3:]}"
