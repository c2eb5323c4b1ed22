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
import yaml
from safetensors.torch import save_file

from mmpretrain.config import Config, to_dict


def export_model(state: dict[str, torch.Tensor], cfg: Config, out_dir: Path) -> Path:
    """`state`: the model's full state dict (gathered from the shards under FSDP2)."""
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    save_file(state, out / "model.safetensors")
    model_cfg = to_dict(cfg.model)
    parts = {m: _under(state, f"towers.{m}.") for m in cfg.model.modalities}
    parts["text"] = {k: v for k, v in state.items() if k.startswith(("decoder.", "text_proj."))}
    for name, tensors in parts.items():
        (out / name).mkdir(exist_ok=True)
        (out / name / "config.json").write_text(json.dumps({"modality": name, "model": model_cfg}, indent=1))
        save_file(tensors, out / name / "model.safetensors")
    return out


def _under(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
