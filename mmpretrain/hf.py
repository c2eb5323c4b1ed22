"""Hugging Face Llama-family checkpoints as the decoder (`model.decoder.pretrained=<folder>`).

A local folder as `save_pretrained` writes it: `config.json` and `model.safetensors` (or shards
named by `model.safetensors.index.json`), or a Hugging Face repo id whose snapshot is in the local
Hugging Face cache (`HF_HOME`); nothing is downloaded. Llama (SmolLM and TinyLlama are
Llama), Mistral and Qwen2: the same block as ours (RMSNorm, rotary over half-split pairs, SwiGLU)
with grouped-query attention, their own head size, rotary theta and Llama 3's rope scaling, tied
or untied output head, and Qwen2's q/k/v biases. `decoder_config` takes the decoder's fields from
`config.json` (they replace the config file's; a field the command line sets to another value
than the checkpoint's is an error naming both); `load_decoder` copies the weights one tensor at
a time (bf16 shards are not expanded to a whole fp32 copy: each tensor is cast as it is copied),
checking every name and shape.
Mistral's and Qwen2's sliding window is not applied: it matters only past its length (4,096
tokens and more), longer than this library's rows so far.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from mmpretrain.config import ConfigError, DecoderConfig, RopeScalingConfig
from mmpretrain.weights import copy_param

MODEL_TYPES = ("llama", "mistral", "qwen2")
KEY = "model.decoder.pretrained"


def checkpoint_folder(name: str | Path) -> Path:
    """The folder `model.decoder.pretrained` names: a local folder, or a Hugging Face repo id
    (org/name) whose snapshot huggingface_hub finds in the local cache (no network)."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder
    tried = [str(folder.absolute())]
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(str(name))
    except HFValidationError:
        pass  # not a repo id: a local path alone
    else:
        found = try_to_load_from_cache(str(name), "config.json")
        if isinstance(found, str):
            return Path(found).parent
        tried.append(f"the Hugging Face cache {constants.HF_HUB_CACHE} (HF_HOME)")
    raise ConfigError(f"{KEY}: {str(name)!r} not found: tried {' and '.join(tried)}; expected a Hugging Face "
                      f"checkpoint folder (config.json and *.safetensors, as save_pretrained writes them) or "
                      f"the id of one in the local Hugging Face cache (nothing is downloaded)")


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{KEY}: {str(folder)!r} has no config.json: expected a Hugging Face checkpoint folder "
                          f"(config.json and *.safetensors, as save_pretrained writes them)")
    hf = json.loads(path.read_text())
    kind = hf.get("model_type")
    if kind not in MODEL_TYPES:
        raise ConfigError(f"{KEY}: model_type {kind!r} in {path}; supported: {', '.join(MODEL_TYPES)} (and "
                          f"models of their architecture, such as SmolLM, TinyLlama)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{KEY}: hidden_act {hf['hidden_act']!r}; the decoder's SwiGLU uses silu")
    if hf.get("mlp_bias") or (kind == "llama" and hf.get("attention_bias")):
        raise ConfigError(f"{KEY}: {path} has biases in its MLP or output projection; the decoder has none")
    return hf


def _rope(hf: dict) -> tuple[float, RopeScalingConfig]:
    """(theta, scaling) from `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in ("default", None):
        return theta, RopeScalingConfig()
    if kind != "llama3":
        raise ConfigError(f"{KEY}: rope type {kind!r}; supported: default and llama3")
    return theta, RopeScalingConfig("llama3", float(params["factor"]), float(params["low_freq_factor"]),
                                    float(params["high_freq_factor"]), int(params["original_max_position_embeddings"]))


def checkpoint_fields(hf: dict) -> dict:
    """config.json -> DecoderConfig field values."""
    width, heads = hf["hidden_size"], hf["num_attention_heads"]
    theta, scaling = _rope(hf)
    head_dim = hf.get("head_dim") or width // heads
    return {"width": width, "layers": hf["num_hidden_layers"], "heads": heads,
            "kv_heads": hf.get("num_key_value_heads") or heads,
            "head_dim": 0 if head_dim * heads == width else head_dim, "mlp_hidden": hf["intermediate_size"],
            "rope_theta": theta, "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "qkv_bias": hf["model_type"] == "qwen2", "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "vocab_size": hf["vocab_size"], "rope_scaling": scaling}


def decoder_config(cfg: DecoderConfig, given: dict) -> DecoderConfig:
    """The run's decoder section with the checkpoint's fields, which replace the config file's;
    a field in `given` (the command line's model.decoder) must agree with the checkpoint's
    (kv_heads=0 means `heads`). Its weight files are checked here, before any model is built."""
    folder = checkpoint_folder(cfg.pretrained)
    theirs = checkpoint_fields(read_config(folder))
    _tensor_files(folder)
    same = {"kv_heads": lambda a, b: (a or theirs["heads"]) == b}
    clash = [f"{k}={getattr(cfg, k)!r} (the checkpoint's: {v!r})" for k, v in theirs.items()
             if k in given and not same.get(k, lambda a, b: a == b)(getattr(cfg, k), v)]
    if clash:
        raise ConfigError(f"model.decoder: {', '.join(clash)} disagree with {KEY}={cfg.pretrained!r}; leave them "
                          f"out (they come from its config.json) or give the checkpoint's values")
    return dataclasses.replace(cfg, **theirs)


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        missing = sorted({f.name for f in files.values() if not f.is_file()})
        if missing:
            raise ConfigError(f"{KEY}: {folder} lacks {len(missing)} of the files its {index.name} names, e.g. "
                              f"{', '.join(missing[:3])}")
        return files
    single = folder / "model.safetensors"
    if not single.is_file():
        raise ConfigError(f"{KEY}: {folder} has neither model.safetensors nor model.safetensors.index.json")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {k: single for k in f.keys()}


def weight_map(decoder) -> list[tuple[torch.Tensor, list[str]]]:
    """Each decoder parameter and the checkpoint tensor(s) it is made of (concatenated along rows
    where more than one)."""
    out = [(decoder.embed.weight, ["model.embed_tokens.weight"]), (decoder.norm.weight, ["model.norm.weight"])]
    if decoder.lm_head is not None:
        out.append((decoder.lm_head.weight, ["lm_head.weight"]))
    for i, block in enumerate(decoder.blocks):
        p = f"model.layers.{i}."
        attn = {x: f"{p}self_attn.{x}_proj" for x in "qkv"}
        out += [(block.attn_norm.weight, [f"{p}input_layernorm.weight"]),
                *[(getattr(block, x).weight, [f"{a}.weight"]) for x, a in attn.items()],
                (block.proj.weight, [f"{p}self_attn.o_proj.weight"]),
                (block.mlp_norm.weight, [f"{p}post_attention_layernorm.weight"]),
                (block.mlp.gate.weight, [f"{p}mlp.gate_proj.weight"]),
                (block.mlp.up.weight, [f"{p}mlp.up_proj.weight"]),
                (block.mlp.down.weight, [f"{p}mlp.down_proj.weight"])]
        if block.q.bias is not None:
            out += [(getattr(block, x).bias, [f"{a}.bias"]) for x, a in attn.items()]
    return out


@torch.no_grad()
def load_decoder(decoder, folder: str | Path) -> str:
    """Copy the checkpoint's weights into `decoder` (plain tensors or FSDP2's DTensor shards: each
    rank reads the file and keeps its shard) -> a line for the log."""
    from safetensors import safe_open

    folder = checkpoint_folder(folder)
    files = _tensor_files(folder)
    wanted = weight_map(decoder)
    missing = [n for _, names in wanted for n in names if n not in files]
    if missing:
        raise ConfigError(f"{KEY}: {folder} lacks {len(missing)} tensor(s) the decoder needs, e.g. "
                          f"{', '.join(missing[:3])}")
    used = {n for _, names in wanted for n in names}
    extra = sorted(n for n in files if n not in used and not n.endswith("rotary_emb.inv_freq")
                   and not (n == "lm_head.weight" and decoder.lm_head is None))
    if extra:
        raise ConfigError(f"{KEY}: {folder} holds {len(extra)} tensor(s) the decoder has no place for, e.g. "
                          f"{', '.join(extra[:3])}")
    handles, dtypes = {}, set()
    try:
        for param, names in wanted:
            parts = []
            for n in names:
                if files[n] not in handles:
                    handles[files[n]] = safe_open(files[n], framework="pt").__enter__()
                parts.append(handles[files[n]].get_tensor(n))
                dtypes.add(str(parts[-1].dtype).removeprefix("torch."))
            full = parts[0] if len(parts) == 1 else torch.cat(parts)
            if tuple(full.shape) != tuple(param.shape):
                raise ConfigError(f"{KEY}: {', '.join(names)} {tuple(full.shape)} do not fit the decoder's "
                                  f"{tuple(param.shape)}")
            copy_param(param, full)
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return (f"decoder: {len(used)} tensors ({', '.join(sorted(dtypes))}) from {folder} "
            f"({len(set(files.values()))} file(s))")
