"""The multimodal model: encoders -> fusion -> shared causal decoder.

One decoder pass per batch handles both objectives, packed:
  - caption-only sequences  [sot, caption, eot]  -> text embedding at eot (contrastive)
  - media+caption sequences [media tokens of every present modality, sot, caption, eot]
    -> next-token logits on the caption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmpretrain.attention import Packing
from mmpretrain.config import ModelConfig
from mmpretrain.data.batch import Batch
from mmpretrain.decoder import Decoder
from mmpretrain.encoders import ENCODERS
from mmpretrain.fusion import Resampler


def contrastive_pairs(modalities: list[str], media_pairs: bool) -> list[tuple[str, str]]:
    pairs = [("text", m) for m in modalities]
    if media_pairs:
        pairs += [(a, b) for i, a in enumerate(modalities) for b in modalities[i + 1 :]]
    return pairs


class MediaTower(nn.Module):
    """One modality's encoder and fusion: raw input -> decoder tokens and a contrastive embedding."""

    def __init__(self, modality: str, cfg: ModelConfig):
        super().__init__()
        self.encoder = ENCODERS[modality](getattr(cfg, modality))
        self.fusion = Resampler(self.encoder.width, cfg.decoder.width, cfg.fusion)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> decoder tokens (B, K, C) and L2-normalised embedding (B, E)."""
        tokens, pooled = self.fusion(self.encoder(x))
        return tokens, F.normalize(pooled, dim=-1)


@dataclass
class ModelOutput:
    embeddings: dict[str, torch.Tensor]  # modality -> (B, E) L2-normalised
    present: dict[str, torch.Tensor]  # modality -> (B,) bool
    lm_logits: torch.Tensor  # (P, vocab) at caption positions that predict a next token
    lm_targets: torch.Tensor  # (P,)
    packed_tokens: int = 0  # length of the packed decoder row


class MultimodalModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, media_pairs: bool = True,
                 init_temperature: float = 0.07):
        super().__init__()
        self.cfg = cfg
        self.modalities = list(cfg.modalities)
        width = cfg.decoder.width
        self.towers = nn.ModuleDict({m: MediaTower(m, cfg) for m in self.modalities})
        self.decoder = Decoder(cfg.decoder, vocab_size, cfg.attention.backend)
        self.text_proj = nn.Linear(width, cfg.fusion.embed_dim, bias=False)
        # one learnable temperature per contrastive pair, stored as log(1/T) as in CLIP
        self.logit_scale = nn.ParameterDict({
            f"{a}-{b}": nn.Parameter(torch.tensor(math.log(1 / init_temperature)))
            for a, b in contrastive_pairs(self.modalities, media_pairs)})

    # ---------------------------------------------------------------- encoders
    def encode_media(self, modality: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> decoder tokens (B, K, C) and normalised embedding (B, E)."""
        return self.towers[modality](x)

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Caption alone through the decoder, pooled at eot: (B, L) -> (B, E) normalised."""
        x, packing, _ = self._pack(tokens, lengths, [])
        return self._text_embedding(self.decoder(x, packing), packing, len(tokens))

    def _text_embedding(self, h: torch.Tensor, packing: Packing, n: int) -> torch.Tensor:
        eot = packing.cu_seqlens[1 : n + 1] - 1  # last token of the first n (caption-only) sequences
        return F.normalize(self.text_proj(h[eot]), dim=-1)

    # ---------------------------------------------------------------- packing
    def _pack(self, tokens, lengths, prefixes: list[torch.Tensor]):
        """Caption-only sequences for every sample, then media+caption for len(prefixes) samples.

        prefixes[i]: (K_i, C) media tokens of sample i. Returns the packed input (T, C),
        its Packing, and the packed index of every caption token that has a next token
        together with that target.
        """
        text = self.decoder.embed(tokens)  # (B, L, C)
        lengths_list = lengths.tolist()
        pieces = [text[i, :n] for i, n in enumerate(lengths_list)]
        seq_lens = list(lengths_list)
        for i, prefix in enumerate(prefixes):
            pieces += [prefix, text[i, : lengths_list[i]]]
            seq_lens.append(len(prefix) + lengths_list[i])
        packing = Packing.from_lengths(seq_lens, device=tokens.device)
        starts = packing.cu_seqlens[len(lengths_list) :].tolist()
        idx, tgt = [], []
        for i, prefix in enumerate(prefixes):
            first = starts[i] + len(prefix)  # position of sot
            n = lengths_list[i]
            idx.append(torch.arange(first, first + n - 1))
            tgt.append(tokens[i, 1:n])
        idx = torch.cat(idx).to(tokens.device) if idx else tokens.new_zeros(0)
        tgt = torch.cat(tgt) if tgt else tokens.new_zeros(0)
        return torch.cat(pieces), packing, (idx, tgt)

    # ---------------------------------------------------------------- forward
    def forward(self, batch: Batch, next_token_samples: int | None = None) -> ModelOutput:
        b = len(batch)
        embeddings, media_tokens = {}, {}
        for m in self.modalities:
            media_tokens[m], embeddings[m] = self.encode_media(m, batch.media[m])
        n_lm = b if not next_token_samples else min(b, next_token_samples)
        prefixes = [
            torch.cat([media_tokens[m][i] for m in self.modalities if batch.present[m][i]]
                      or [media_tokens[self.modalities[0]][i, :0]])
            for i in range(n_lm)
        ]
        x, packing, (idx, targets) = self._pack(batch.tokens, batch.lengths, prefixes)
        h = self.decoder(x, packing)
        embeddings["text"] = self._text_embedding(h, packing, b)
        present = {"text": torch.ones(b, dtype=torch.bool, device=h.device), **batch.present}
        return ModelOutput(embeddings, present, self.decoder.logits(h[idx]), targets, len(x))
