"""The packed decoder row: the one owner of its layout.

A batch becomes ONE row of sequences laid end to end (attention never crosses
them, positions restart in each):

    [caption-only x B] [media + caption x captioned pairs] [documents]

  - caption-only      [sot, caption, eot]                 -> the text embedding, pooled at eot
  - media + caption   [media tokens of every present modality, sot, caption, eot]
                                                           -> next-token targets on the caption
  - document          interleaved text segments and media -> next-token targets on its text

Only the first `captioned` pairs of a batch get a media+caption sequence
(`objectives.next_token_max_samples`, 0 = all). The data pipeline budgets rows
with `RowLayout.sample_tokens` and the model builds them with the functions
below, so the two always agree on a row's length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

# A piece of a sequence: embeddings (n, C) and targets (n,) or None, where targets[j] is the
# token id that the *previous* position must predict, or -1 for none (sot, media, caption-only).
Piece = tuple[torch.Tensor, "torch.Tensor | None"]


@dataclass
class Packing:
    """Layout of packed sequences; built once per forward and shared by all layers."""

    cu_seqlens: torch.Tensor  # (N + 1,) int64, cu_seqlens[i] = start of sequence i
    max_len: int
    positions: torch.Tensor  # (T,) position of each token inside its own sequence
    pad_index: torch.Tensor  # (T,) flat index of each token in an (N, max_len) grid
    _block_mask: object = field(default=None, repr=False, compare=False)  # see block_mask
    ring: object = field(default=None, repr=False, compare=False)  # parallel.ring.RingLayout under cp

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor | list[int], device=None) -> Packing:
        lengths = torch.as_tensor(lengths, dtype=torch.long, device=device)
        cu = F.pad(lengths.cumsum(0), (1, 0))
        starts = torch.repeat_interleave(cu[:-1], lengths)
        positions = torch.arange(int(cu[-1]), device=lengths.device) - starts
        seq_id = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
        max_len = int(lengths.max())
        return cls(cu, max_len, positions, seq_id * max_len + positions)

    @property
    def lengths(self) -> torch.Tensor:
        return self.cu_seqlens.diff()

    @property
    def num_seqs(self) -> int:
        return len(self.cu_seqlens) - 1

    def block_mask(self, build: Callable[[Packing], object]) -> object:
        """The row's attention mask (FlexAttention's BlockMask): `build(self)` on the first call, kept
        for the later ones (every layer of one forward shares the row)."""
        if self._block_mask is None:
            self._block_mask = build(self)
        return self._block_mask


@dataclass(frozen=True)
class RowLayout:
    num_latents: int  # decoder tokens per media item (model.fusion.num_latents)
    captioned: int = 0  # pairs per batch with a media+caption sequence, 0 = all
    next_token: bool = True  # False (objectives.next_token_weight 0): no media+caption sequences

    @classmethod
    def from_config(cls, cfg) -> RowLayout:
        """From a `Config`: the model's fusion and the objectives' captioning settings."""
        o = cfg.objectives
        return cls(cfg.model.fusion.num_latents, o.next_token_max_samples, o.next_token_weight > 0)

    def captions(self, pair_index: int) -> bool:
        """Whether the pair at this index of its batch gets a media+caption sequence."""
        return self.next_token and (not self.captioned or pair_index < self.captioned)

    def pair_tokens(self, caption_length: int, media_items: int, pair_index: int) -> int:
        """Row tokens of a media-caption pair: its caption alone, then (if captioned) its media
        tokens followed by the caption again."""
        captioned = self.captions(pair_index)
        return caption_length + captioned * (media_items * self.num_latents + caption_length)

    def document_tokens(self, segments: list[tuple[str, torch.Tensor]]) -> int:
        """Text segments (token ids, sot and eot included) and each media item's tokens."""
        return sum(len(v) if kind == "text" else self.num_latents for kind, v in segments)

    def sample_tokens(self, sample: dict, pair_index: int, modalities) -> int:
        """Row tokens of a parsed sample (see data.samples) at `pair_index` among its batch's pairs."""
        if "document" in sample:
            return self.document_tokens(sample["document"])
        return self.pair_tokens(sample["length"], sum(m in sample for m in modalities), pair_index)


# ---------------------------------------------------------------------------- sequences


def caption_only(text: torch.Tensor) -> list[Piece]:
    """[sot, caption, eot] embeddings (n, C), no targets: pooled at eot for the text embedding."""
    return [(text, None)]


def media_caption(media: list[torch.Tensor], text: torch.Tensor, ids: torch.Tensor) -> list[Piece]:
    """Media tokens, then the caption (ids (n,) with sot and eot); every caption token but sot
    is a target (sot follows the media: it is given, not predicted)."""
    targets = ids.clone()
    targets[0] = -1
    return [(m, None) for m in media] + [(text, targets)]


def document(segments: list[tuple[torch.Tensor, torch.Tensor | None]]) -> list[Piece]:
    """Interleaved (embeddings, ids) for text and (embeddings, None) for media: every text token
    is a target except the document's leading sot."""
    pieces = []
    for emb, ids in segments:
        targets = None
        if ids is not None:
            targets = ids.clone()
            if not pieces:
                targets[0] = -1
        pieces.append((emb, targets))
    return pieces


def pack(seqs: list[list[Piece]]) -> tuple[torch.Tensor, Packing, torch.Tensor, torch.Tensor]:
    """Lay sequences end to end -> packed input (T, C), its Packing, the positions that predict
    a token (P,) and those token ids (P,)."""
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
    return x, packing, idx, targets[idx + 1]


def caption_ends(packing: Packing, n: int) -> torch.Tensor:
    """Row index of the eot of each of the first n sequences (the caption-only ones)."""
    return packing.cu_seqlens[1 : n + 1] - 1
