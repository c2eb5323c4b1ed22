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
        _, seqs = self._captions(tokens, lengths)
        x, packing, _ = self._pack(seqs)
        return self._text_embedding(self.decoder(x, packing), packing, len(tokens))

    def _captions(self, tokens: torch.Tensor, lengths: torch.Tensor):
        """-> caption embeddings (B, L, C), and one caption-only sequence per sample (no targets)."""
        text = self.decoder.embed(tokens)
        return text, [[(text[i, :n], None)] for i, n in enumerate(lengths.tolist())]

    def _text_embedding(self, h: torch.Tensor, packing: Packing, n: int) -> torch.Tensor:
        eot = packing.cu_seqlens[1 : n + 1] - 1  # last token of the first n (caption-only) sequences
        return F.normalize(self.text_proj(h[eot]), dim=-1)

    # ---------------------------------------------------------------- packing
    @staticmethod
    def _pack(seqs: list[list[tuple[torch.Tensor, torch.Tensor | None]]]):
        """Lay sequences end to end. Each sequence is a list of pieces (embeddings (n, C),
        targets (n,) or None), where targets[j] is the token id that the *previous* position
        must predict, or -1 for none (sot, media, caption-only text).
        -> packed input (T, C), its Packing, (positions that predict a token, those token ids)."""
        embs, targets, lengths = [], [], []
        for pieces in seqs:
            for emb, tgt in pieces:
                embs.append(emb)
                targets.append(tgt if tgt is not None else torch.full((len(emb),), -1, device=emb.device))
            lengths.append(sum(len(emb) for emb, _ in pieces))
        x, targets = torch.cat(embs), torch.cat(targets)
        packing = Packing.from_lengths(lengths, device=x.device)
        predicts = targets.roll(-1) >= 0  # position p predicts the token at p + 1 ...
        predicts[packing.cu_seqlens[1:] - 1] = False  # ... within its own sequence
        idx = predicts.nonzero().squeeze(1)
        return x, packing, (idx, targets[idx + 1])

    def _document(self, doc, media_tokens) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """An interleaved document: every text token is a target but the leading sot."""
        pieces = []
        for kind, value in doc:
            if kind == "text":
                tgt = value.clone()
                if not pieces:
                    tgt[0] = -1
                pieces.append((self.decoder.embed(value), tgt))
            else:
                pieces.append((next(media_tokens[kind]), None))
        return pieces

    # ---------------------------------------------------------------- forward
    def forward(self, batch: Batch, next_token_samples: int | None = None) -> ModelOutput:
        """Packed row: caption-only sequences (all pairs), media+caption sequences (the first
        `next_token_samples` pairs, 0/None = all), then interleaved documents."""
        b = len(batch.keys)
        embeddings, media_tokens = {}, {}
        for m in self.modalities:
            if b:
                media_tokens[m], embeddings[m] = self.encode_media(m, batch.media[m])
            else:  # documents only; still a graph leaf, so that data-parallel gathers of the
                # embeddings run their backward on every rank alike
                embeddings[m] = torch.zeros(0, self.text_proj.out_features, device=batch.tokens.device,
                                            requires_grad=True)
        text, seqs = self._captions(batch.tokens, batch.lengths)
        lengths = batch.lengths.tolist()
        for i in range(b if not next_token_samples else min(b, next_token_samples)):
            caption_targets = batch.tokens[i, : lengths[i]].clone()
            caption_targets[0] = -1  # sot follows the media; it is given, not predicted
            seqs.append([(media_tokens[m][i], None) for m in self.modalities if batch.present[m][i]]
                        + [(text[i, : lengths[i]], caption_targets)])
        doc_media = {m: [v for doc in batch.documents for k, v in doc if k == m] for m in self.modalities}
        doc_tokens = {m: iter(self.encode_media(m, torch.stack(items))[0])
                      for m, items in doc_media.items() if items}
        seqs += [self._document(doc, doc_tokens) for doc in batch.documents]
        x, packing, (idx, targets) = self._pack(seqs)
        h = self.decoder(x, packing)
        embeddings["text"] = self._text_embedding(h, packing, b)
        present = {"text": torch.ones(b, dtype=torch.bool, device=h.device), **batch.present}
        return ModelOutput(embeddings, present, self.decoder.logits(h[idx]), targets, len(x))
