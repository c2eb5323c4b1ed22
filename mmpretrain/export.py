"""Exporting a trained model for downstream use (safetensors only, never pickle).

    export/
      config.yaml           resolved config of the run (model, preprocessing, tokenizer)
      model.safetensors     encoders, fusion and text tower  -> `load_pretrained(export/)`
      image/ audio/ text/   each tower alone                 -> `load_encoder(export/image)`
        config.json         the model config it needs, preprocessing included
        model.safetensors

Training-only state (the objectives' temperatures, optimizer) stays in the
checkpoints. Loading lives in `mmpretrain.pretrained`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from safetensors.torch import save_file

from mmpretrain.config import Config, to_dict
from mmpretrain.model import MultimodalModel


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
