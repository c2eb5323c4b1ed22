"""Exporting a trained model for downstream use (safetensors only, never pickle).

    export/
      config.yaml            resolved config of the run (model, preprocessing, tokenizer)
      model.safetensors      encoders, fusion and text tower  -> `load_pretrained(export/)`
      objectives.safetensors the objectives' learned state: one temperature per contrasted pair
                             (`logit_scale.text-image`, log(1/T)) -> `Pretrained.similarity`
      image/ audio/ text/    each tower alone                 -> `load_encoder(export/image)`
        config.json          the model config it needs, preprocessing included
        model.safetensors

The optimizer and the data position stay in the checkpoints. Loading lives in
`mmpretrain.pretrained`. Every file is written with the mode the process umask gives.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from mmpretrain.config import Config, to_dict


def export_model(state: dict[str, torch.Tensor], cfg: Config, out_dir: Path) -> Path:
    """`state`: the training task's full state dict, `model.*` and `objectives.*` (gathered from
    the shards under FSDP2)."""
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    model = _under(state, "model.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the decoder's weights are in the export now, its fields resolved: no longer the checkpoint's;
    # a Hugging Face tokenizer travels with it, in export/tokenizer/
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, decoder=dataclasses.replace(cfg.model.decoder, pretrained=""),
        text=dataclasses.replace(cfg.model.text, tokenizer=_copy_tokenizer(cfg.model.text.tokenizer, out))))
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    save_weights(model, out / "model.safetensors")
    save_weights(_under(state, "objectives."), out / "objectives.safetensors")
    model_cfg = to_dict(cfg.model)
    parts = {m: _under(model, f"towers.{m}.") for m in cfg.model.modalities}
    parts["text"] = {k: v for k, v in model.items() if k.startswith(("decoder.", "text_proj."))}
    for name, tensors in parts.items():
        (out / name).mkdir(exist_ok=True)
        (out / name / "config.json").write_text(json.dumps({"modality": name, "model": model_cfg}, indent=1))
        save_weights(tensors, out / name / "model.safetensors")
    return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json")


def _copy_tokenizer(tokenizer: str, out: Path) -> str:
    """hf:<folder> -> its files copied to out/tokenizer/, named relative to the export
    ("hf:tokenizer"; pretrained.py resolves it against the export's folder)."""
    if not tokenizer.startswith("hf:"):
        return tokenizer
    source = Path(tokenizer[3:]).expanduser()
    if source.resolve() == (out / "tokenizer").resolve():
        return "hf:tokenizer"
    (out / "tokenizer").mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:  # config.json: the special tokens' ids, where the tokenizer's own files lack them
        if (source / name).is_file():
            shutil.copyfile(source / name, out / "tokenizer" / name)
    return "hf:tokenizer"


def save_weights(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    """safetensors' `save_file`, whose file is 0600 whatever the umask, given the mode any new
    file gets (0644 under umask 022), so that others can read exports as the rest of a run."""
    save_file(tensors, path)
    os.chmod(path, 0o666 & ~_umask())
    return Path(path)


def _umask() -> int:
    """The process umask. Reading it means setting it: for that instant it is 077, so a file
    another thread creates meanwhile is at worst private, never open to all."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _under(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
