"""Pretrained weights into the towers (`model.<modality>.pretrained=<file>`) and the copy that
loads any full tensor into a parameter, plain or an FSDP2 shard.

The file is a timm ViT checkpoint (its `state_dict`, as timm saves or `torch.save(model.state_dict())`
writes it) or an OpenAI-CLIP / open_clip model's (the whole model's or its `visual`'s): timm's own
`checkpoint_filter_fn` maps CLIP's names to timm's and resamples the position embedding (and the
patch kernel) when the image size or patch grid differs, so this module adds only what timm has
no function for: the audio tower's start the AST way (patch kernel averaged over the colour
channels into one, positions resampled to the spectrogram's grid) and the video tower's by
inflation (`VideoEncoder.init_from_image`). CLIP's output projection has no place in a tower
(the fusion makes the embedding): it is left out. Safetensors or torch files; nothing downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from mmpretrain.config import ConfigError


def read_state(file: str | Path, key: str) -> dict[str, torch.Tensor]:
    path = Path(file).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}: {str(file)!r} is not a file: expected a timm or open_clip checkpoint "
                          f"(.safetensors, .pt, .pth, .bin) on this machine (nothing is downloaded)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):  # training scripts' checkpoints around the weights
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "class_embedding" in state and "conv1.weight" in state:  # a CLIP model's `visual` alone
        state = {f"visual.{k}": v for k, v in state.items()}
    return state


def vit_state(file: str | Path, vit: nn.Module, key: str) -> dict[str, torch.Tensor]:
    """A checkpoint as `vit` (a timm VisionTransformer) names and shapes its tensors."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = read_state(file, key)
    channels = vit.patch_embed.proj.weight.shape[1]
    kernel = next((k for k in ("patch_embed.proj.weight", "visual.conv1.weight") if k in state), None)
    if kernel is not None and state[kernel].shape[1] != channels:  # RGB weights into a 1-channel tower (AST)
        state[kernel] = state[kernel].mean(dim=1, keepdim=True).expand(-1, channels, -1, -1)
    state = checkpoint_filter_fn(state, vit)
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def load_vit(vit: nn.Module, file: str | Path, key: str) -> str:
    """`vit_state` into `vit`, every tensor checked; -> a line for the log."""
    state = vit_state(file, vit, key)
    copy_state(vit, state, f"{key}: {file}")
    return f"{key}: {len(state)} tensors from {file}"


def copy_state(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Every parameter and persistent buffer of `module` from `state`, which must hold exactly
    them in their shapes (the error names what is missing, left over or of another shape)."""
    own = dict(module.state_dict())
    missing, extra = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or extra:
        raise ConfigError(f"{what}: the checkpoint does not fit the tower: missing {missing[:4]}"
                          f"{' ...' if len(missing) > 4 else ''}, not in the tower {extra[:4]}"
                          f"{' ...' if len(extra) > 4 else ''} (are the config's width, depth, heads, "
                          f"pre_norm those of the checkpoint?)")
    bad = [f"{k} {tuple(state[k].shape)} (the tower's: {tuple(v.shape)})" for k, v in own.items()
           if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise ConfigError(f"{what}: shapes differ: {', '.join(bad[:4])}")
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    with torch.no_grad():
        for name in own:
            copy_param(tensors[name], state[name])


def copy_param(param: torch.Tensor, full: torch.Tensor) -> None:
    """A full tensor into a parameter: cast to its dtype and device, and where it is an FSDP2
    shard (a DTensor) this rank's part of it (every rank reads the file)."""
    full = full.to(device=param.device, dtype=param.dtype)
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full, param.device_mesh, param.placements)
    with torch.no_grad():
        param.copy_(full)
