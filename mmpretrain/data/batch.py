"""The typed batch that flows from the data pipeline into the model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    keys: list[str]
    tokens: torch.Tensor  # (B, L) int64 caption tokens, 0-padded
    lengths: torch.Tensor  # (B,) caption lengths including sot and eot
    media: dict[str, torch.Tensor]  # "image": (B, 3, H, W), "audio": (B, samples); zeros where absent
    present: dict[str, torch.Tensor]  # modality -> (B,) bool: which samples have it
    skipped: dict[str, int] = field(default_factory=dict)  # bad samples dropped since the last batch

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device, non_blocking: bool = False) -> Batch:
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(self.keys, move(self.tokens), move(self.lengths),
                     {k: move(v) for k, v in self.media.items()},
                     {k: move(v) for k, v in self.present.items()}, dict(self.skipped))


def collate(samples: list[dict], modalities: list[str], tokenizer, media_shapes: dict) -> Batch:
    """samples: dicts with "__key__", "text" and any of `modalities` as tensors."""
    tokens, lengths = tokenizer([s["text"] for s in samples])
    media, present = {}, {}
    for m in modalities:
        has = torch.tensor([m in s for s in samples])
        zero = torch.zeros(media_shapes[m])
        media[m] = torch.stack([s.get(m, zero) for s in samples])
        present[m] = has
    return Batch([s["__key__"] for s in samples], tokens, lengths, media, present)
