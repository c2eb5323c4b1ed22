"""The shared causal decoder: pre-norm blocks of RMSNorm, rotary attention and SwiGLU.

It works on packed sequences (tokens of many sequences end to end, see
`packing.Packing`), so media+caption rows, caption-only rows and, later,
long interleaved documents all go through the same code.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmpretrain.attention import PackedAttention
from mmpretrain.config import DecoderConfig
from mmpretrain.moe import MoE
from mmpretrain.packing import Packing


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, H, D); cos, sin: (T, 1, D/2). Rotates pairs (x[..., :D/2], x[..., D/2:])."""
    a, b = x.float().chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1).type_as(x)


def scaled_frequencies(inv_freq: torch.Tensor, scaling) -> torch.Tensor:
    """Llama 3's rotary scaling (`RopeScalingConfig`; the Llama 3 paper's formula, which Hugging
    Face's rope_type "llama3" computes): low frequencies slowed by `factor`, high ones kept, a
    linear blend in wavelength between."""
    if scaling.rope_type == "none":
        return inv_freq
    old = scaling.original_max_position_embeddings
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    smooth = ((old / wavelength - low) / (high - low)).clamp(0, 1)  # 0 past old / low, 1 under old / high
    return (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq


def _split_fused(state_dict, prefix: str, fused: str, parts: list[tuple[str, int]]) -> None:
    """A state dict written before the projections were separate (one fused `fused` linear)
    -> the separate ones' keys, rows split in the fused order. Exports of earlier versions load."""
    for suffix in ("weight", "bias"):
        key = f"{prefix}{fused}.{suffix}"
        if key in state_dict:
            for (name, _), piece in zip(parts, state_dict.pop(key).split([n for _, n in parts])):
                state_dict[f"{prefix}{name}.{suffix}"] = piece


class SwiGLU(nn.Module):
    """Separate gate and up projections (not one fused): tensor parallelism shards each by rows."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(width, hidden, bias=False)
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _split_fused(state_dict, prefix, "gate_up", [("gate", self.gate.out_features), ("up", self.up.out_features)])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class DecoderBlock(nn.Module):
    """Llama's block: grouped-query attention (`kv_heads` key/value heads, each serving
    heads / kv_heads query heads), q/k/v projections as Hugging Face's Llama has them (Qwen2's
    biases optional; separate, so that tensor parallelism can shard each by heads). Its MLP is a
    mixture of experts where `cfg.moe` makes block `index` one."""

    def __init__(self, cfg: DecoderConfig, backend: str, index: int = 0):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.key_value_heads, cfg.head_width
        hidden = cfg.mlp_hidden or 8 * round(cfg.mlp_ratio * cfg.width / 8)
        self.attn_norm = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)
        self.q = nn.Linear(cfg.width, self.heads * self.head_dim, bias=cfg.qkv_bias)
        self.k = nn.Linear(cfg.width, self.kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v = nn.Linear(cfg.width, self.kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.attention = PackedAttention(backend)
        self.proj = nn.Linear(self.heads * self.head_dim, cfg.width, bias=False)
        self.mlp_norm = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)
        moe = cfg.moe
        self.mlp = MoE(cfg.width, moe.hidden or hidden, moe) if moe.experts and (index + 1) % moe.every == 0 \
            else SwiGLU(cfg.width, hidden)

    def forward(self, x, packing: Packing, cos, sin):  # x: (T, C)
        t, h = len(x), self.attn_norm(x)
        # heads from the output widths: under tensor parallelism each rank holds some of them
        q, k, v = (proj(h).view(t, -1, self.head_dim) for proj in (self.q, self.k, self.v))
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)  # (T, H, D), (T, KV, D)
        if self.kv_heads != self.heads:  # every attention path (packed kernels, Ulysses' all-to-all
            # over heads) takes one key/value head per query head: each shared head repeated
            k, v = (y.repeat_interleave(self.heads // self.kv_heads, dim=1) for y in (k, v))
        x = x + self.proj(self.attention(q, k, v, packing).reshape(t, -1))
        return x + self.mlp(self.mlp_norm(x))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _split_fused(state_dict, prefix, "qkv", [(n, getattr(self, n).out_features) for n in "qkv"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Decoder(nn.Module):
    """`caption_positions` > 0: a learned absolute embedding for each of the first that many
    positions of a caption, added by `embed_caption` (see TextConfig.position_embedding)."""

    def __init__(self, cfg: DecoderConfig, vocab_size: int, backend: str = "auto", caption_positions: int = 0):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(vocab_size, cfg.width)
        self.caption_pos = nn.Parameter(torch.empty(caption_positions, cfg.width)) if caption_positions else None
        self.blocks = nn.ModuleList(DecoderBlock(cfg, backend, i) for i in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.width, vocab_size, bias=False)
        self.register_buffer("inv_freq", torch.empty(cfg.head_width // 2), persistent=False)
        self.init_buffers()
        self.init_weights()

    @property
    def output_weight(self) -> torch.Tensor:
        """(vocab, C): logits = hidden @ output_weight.T (the token embedding when tied)."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def no_weight_decay(self) -> set[str]:
        """The token embedding (tied to the output head) and the caption positions take no weight
        decay (positions in input space, as timm's ViT position embedding)."""
        return {"embed.weight", "caption_pos"}

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Rotary frequencies (also after a model built on the meta device is allocated)."""
        head_dim = self.cfg.head_width
        arange = torch.arange(0, head_dim, 2, device=self.inv_freq.device).float()
        self.inv_freq.copy_(scaled_frequencies(self.cfg.rope_theta ** (-arange / head_dim), self.cfg.rope_scaling))

    def init_weights(self):
        nn.init.normal_(self.embed.weight, std=0.02)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        if self.caption_pos is not None:
            nn.init.normal_(self.caption_pos, std=0.01)  # CLIP's text position embedding
        out_std = 0.02 / (2 * self.cfg.layers) ** 0.5  # scaled residual projections (GPT-2)
        for block in self.blocks:
            for lin in (block.q, block.k, block.v):
                nn.init.normal_(lin.weight, std=0.02)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            nn.init.normal_(block.proj.weight, std=out_std)
            if isinstance(block.mlp, MoE):
                block.mlp.init_weights(0.02, out_std)
            else:
                nn.init.normal_(block.mlp.gate.weight, std=0.02)
                nn.init.normal_(block.mlp.up.weight, std=0.02)
                nn.init.normal_(block.mlp.down.weight, std=out_std)

    def embed_caption(self, tokens: torch.Tensor) -> torch.Tensor:
        """Caption token ids (B, L) -> input embeddings (B, L, C), with caption positions if any."""
        x = self.embed(tokens)
        return x if self.caption_pos is None else x + self.caption_pos[: tokens.shape[1]]

    def forward(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        """x: (T, C) packed input embeddings -> (T, C) normalised hidden states."""
        angles = packing.positions[:, None].float() * self.inv_freq[None]  # (T, D/2)
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]
        for block in self.blocks:
            x = block(x, packing, cos, sin)
        return self.norm(x)
