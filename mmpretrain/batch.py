"""The typed batch that flows from the data pipeline into the model (ground floor: both use it)."""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass, field

import torch


class BadSample(Exception):
    """A sample that cannot be used; `reason` is the short tag the pipeline counts it under. Here,
    not beside the decoders that raise it, so that reading captions alone loads no decoder."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class Batch:
    keys: list[str]
    tokens: torch.Tensor  # (B, L) int64 caption tokens, 0-padded
    lengths: torch.Tensor  # (B,) caption lengths including sot and eot
    media: dict[str, torch.Tensor]  # "image": (B, 3, H, W), "audio": (B, samples); zeros where absent
    present: dict[str, torch.Tensor]  # modality -> (B,) bool: which samples have it
    skipped: dict[str, int] = field(default_factory=dict)  # bad samples dropped since the last batch
    # interleaved documents: per document, segments ("text", ids (n,)) or (modality, media tensor)
    documents: list[list[tuple[str, torch.Tensor]]] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)  # every caption of each pair (eval)
    row_tokens: int = 0  # length of the packed decoder row this batch becomes (packing.RowLayout)
    row_budget: int = 0  # the token budget it was packed under (data.max_tokens), 0 for none
    # where it came from (data.stream): samples per source, the reader, and how many raw samples
    # that reader had consumed once this batch was closed (its resume position)
    sources: dict[str, int] = field(default_factory=dict)
    worker: int = 0
    position: int = 0
    # offline distillation (objectives.distill.teacher=offline): the teacher's stored embeddings,
    # "text" (of each sample's chosen caption) and its modalities, (B, E), zeros where absent,
    # and its logit scales per pair
    teacher: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_scale: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        """Samples in the batch: media-caption pairs and documents."""
        return len(self.keys) + len(self.documents)

    def to(self, device, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Page-locked copies, so that `.to(cuda, non_blocking=True)` overlaps the step (the
        DataLoader calls this in its pinning thread)."""
        return self._map(lambda t: t.pin_memory())

    def _map(self, move) -> Batch:
        return dataclasses.replace(self, tokens=move(self.tokens), lengths=move(self.lengths),
                                   media={k: move(v) for k, v in self.media.items()},
                                   present={k: move(v) for k, v in self.present.items()},
                                   documents=[[(kind, move(t)) for kind, t in doc] for doc in self.documents],
                                   teacher={k: move(v) for k, v in self.teacher.items()})


def collate(samples: list[dict], media_shapes: dict[str, tuple], context_length: int) -> Batch:
    """samples: dicts with "__key__", caption "tokens" (context_length,) and "length", "captions"
    and any of the modalities in `media_shapes` as tensors; or with "document" (segments, text as
    token ids). Absent media are zeros of their modality's shape."""
    documents = [s["document"] for s in samples if "document" in s]
    samples = [s for s in samples if "document" not in s]
    tokens = (torch.stack([s["tokens"] for s in samples]) if samples
              else torch.zeros(0, context_length, dtype=torch.long))
    lengths = torch.tensor([s["length"] for s in samples], dtype=torch.long)
    media, present = {}, {}
    for m, shape in media_shapes.items():
        has = torch.tensor([m in s for s in samples], dtype=torch.bool)
        zero = torch.zeros(shape)
        media[m] = torch.stack([s.get(m, zero) for s in samples]) if samples else zero[None][:0]
        present[m] = has
    taught = [s["teacher"] for s in samples if "teacher" in s]
    keys = sorted({k for t in taught for k in t if k != "scale"})
    teacher = {k: torch.stack([t[k] if k in t else torch.zeros_like(next(u[k] for u in taught if k in u))
                               for t in taught]) for k in keys}
    return Batch([s["__key__"] for s in samples], tokens, lengths, media, present, documents=documents,
                 captions=[s["captions"] for s in samples], teacher=teacher,
                 teacher_scale=taught[0]["scale"] if taught else {})


def coverage(batch: Batch, pairs: list[str]) -> collections.Counter:
    """Samples of `batch` that reach each modality's tower ("image", in pairs or documents) and
    each contrastive pair of `pairs` ("text-image", "image-audio": samples with both sides; every
    media-caption pair has its text)."""
    has = {"text": torch.ones(len(batch.keys), dtype=torch.bool), **{m: p.cpu() for m, p in batch.present.items()}}
    seen = collections.Counter({m: int(p.sum()) for m, p in batch.present.items()})
    seen.update(kind for doc in batch.documents for kind, _ in doc if kind != "text")
    for pair in pairs:
        a, b = pair.split("-")
        seen[pair] += int((has[a] & has[b]).sum())
    return seen
