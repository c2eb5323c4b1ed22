"""Distillation from a frozen teacher: the student's similarity distributions over the batch pulled
towards the teacher's (open_clip's `DistillClipLoss`; PR #399: L/14 into B/32, +4 points).

Per modality pair, over the global batch's samples with both sides: the cross-entropy of the
student's softmax over each row (a's against every b, and b's against every a) to the teacher's,
each logit scaled by its own model's temperature, both directions averaged. The teacher is an
mmpretrain export (`objectives.distill.teacher`): loaded once, in eval mode, without gradients,
kept outside the trained module (no optimizer state, not sharded by FSDP2, never saved), and it
embeds the same batch the student does, so it must read the same media shapes and captions. Or
an open_clip CLIP from a local checkpoint file (`objectives.distill.open_clip_model` names its
architecture), which reads the student's images at its own size and normalisation. Or
`offline`: its embeddings stored in the shards beforehand (data/teacher_embed.py), which the
batch carries; then the teacher may read any inputs, and costs nothing at training time.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from mmpretrain.config import ConfigError


def soft_cross_entropy(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum softmax(teacher) * log_softmax(student) (open_clip's `dist_loss`)."""
    return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1).mean()


def distill_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, ta: torch.Tensor, tb: torch.Tensor,
                 teacher_scale: float, temperature: float = 1.0) -> torch.Tensor:
    """Both directions' soft cross-entropy of matching rows: student (a, b, scale), teacher (ta, tb,
    teacher_scale), all features normalised. `temperature`: Hinton's distillation temperature, both
    sides' logits divided by it and the loss multiplied by its square (1: open_clip's definition)."""
    student, teacher = scale * a @ b.t() / temperature, teacher_scale * ta @ tb.t() / temperature
    return temperature ** 2 * (soft_cross_entropy(teacher, student) + soft_cross_entropy(teacher.t(), student.t())) / 2


class Teacher:
    """A frozen mmpretrain export that embeds batches: `embed(batch)` -> ModelOutput (no captioning
    sequences), `scale[pair]` its temperatures as logit scales."""

    def __init__(self, folder: str, cfg, device: torch.device):
        from mmpretrain.packing import RowLayout
        from mmpretrain.pretrained import open_model

        pretrained = open_model(folder, device, "objectives.distill.teacher")[0]
        theirs = pretrained.cfg
        if theirs.text != cfg.model.text:
            raise ConfigError("objectives.distill.teacher: its model.text (tokenizer, context_length) differs "
                              "from this run's; the teacher reads the student's caption tokens")
        for m in set(theirs.modalities) & set(cfg.model.modalities):
            if not _same_input(theirs, cfg.model, m):
                raise ConfigError(f"objectives.distill.teacher: its model.{m} takes other inputs than this run's "
                                  f"(sizes, rates or normalisation); the teacher reads the student's batch")
        self.model: nn.Module = pretrained.model.eval().requires_grad_(False)
        self.scale = pretrained.logit_scale or {}
        self.modalities = set(theirs.modalities) | {"text"}
        self.layout = RowLayout(theirs.fusion.num_latents, next_token=False)

    @torch.no_grad()
    def embed(self, batch) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """-> the teacher's embeddings of the batch by modality ("text" too), its logit scales."""
        out = self.model(batch, self.layout)
        return {m: e for m, e in out.embeddings.items() if m in self.modalities}, self.scale


class OpenClipTeacher:
    """A frozen open_clip CLIP built from a local checkpoint file and its model config (a name
    open_clip knows, or a model config JSON), embedding the student's batch: captions as the
    student tokenized them (the same CLIP BPE, padded to the teacher's context), images taken back
    from the student's normalisation and resized and normalised as the teacher was trained."""

    def __init__(self, checkpoint: str, model: str, cfg, device: torch.device):
        import open_clip
        from open_clip.tokenizer import SimpleTokenizer

        key = "objectives.distill"
        if not Path(checkpoint).expanduser().is_file():
            raise ConfigError(f"{key}.teacher: {checkpoint!r} is not a file: with {key}.open_clip_model, point it at "
                              f"a local open_clip checkpoint (nothing is downloaded)")
        if model.endswith(".json"):
            if not Path(model).is_file():
                raise ConfigError(f"{key}.open_clip_model: {model!r}: no such model config file")
            open_clip.add_model_config(model)
            model = Path(model).stem
        if model not in open_clip.list_models():
            raise ConfigError(f"{key}.open_clip_model: {model!r} is neither a model open_clip knows nor a model "
                              f"config .json file")
        if not isinstance(open_clip.get_tokenizer(model), SimpleTokenizer):
            raise ConfigError(f"{key}.open_clip_model: {model} reads another tokenizer than open_clip's CLIP BPE; "
                              f"the teacher reads the student's caption tokens")
        clip = open_clip.create_model(model, pretrained=str(Path(checkpoint).expanduser()), device=device)
        self.model = clip.eval().requires_grad_(False)
        self.context = self.model.context_length
        if cfg.model.text.context_length > self.context:
            raise ConfigError(f"{key}.teacher: its context is {self.context} tokens, shorter than "
                              f"model.text.context_length={cfg.model.text.context_length}")
        visual = self.model.visual
        self.size = tuple(visual.image_size) if isinstance(visual.image_size, (tuple, list)) else (visual.image_size,) * 2
        theirs = visual.preprocess_cfg
        ours = cfg.model.image if "image" in cfg.model.modalities else None
        self.pixels = None if ours is None else (
            torch.tensor(ours.mean, device=device).view(1, 3, 1, 1), torch.tensor(ours.std, device=device).view(1, 3, 1, 1),
            torch.tensor(theirs["mean"], device=device).view(1, 3, 1, 1),
            torch.tensor(theirs["std"], device=device).view(1, 3, 1, 1))
        self.scale = {"text-image": float(self.model.logit_scale.exp())}
        self.modalities = {"text", "image"}

    @torch.no_grad()
    def embed(self, batch) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        import torch.nn.functional as F

        tokens = F.pad(batch.tokens, (0, self.context - batch.tokens.shape[1]))
        out = {"text": F.normalize(self.model.encode_text(tokens).float(), dim=-1)}
        if self.pixels is not None:
            out["image"] = F.normalize(self.model.encode_image(self.images(batch.media["image"])).float(), dim=-1)
        return out, self.scale

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """The student's normalised images -> the teacher's input (its size and normalisation)."""
        import torch.nn.functional as F

        mean, std, their_mean, their_std = self.pixels
        x = x.float() * std + mean
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bicubic", align_corners=False, antialias=True)
        return (x - their_mean) / their_std


class OfflineTeacher:
    """`objectives.distill.teacher=offline`: the embeddings a teacher stored in the shards
    (data/teacher_embed.py), which the batch carries; nothing runs at training time."""

    @staticmethod
    def embed(batch) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        return batch.teacher, batch.teacher_scale


def _same_input(theirs, ours, modality: str) -> bool:
    """Whether the two configs of `modality` preprocess samples to the same tensors."""
    from mmpretrain.encoders import MODALITIES

    spec = MODALITIES[modality]
    a, b = spec.section(theirs), spec.section(ours)
    return spec.media_shape(a) == spec.media_shape(b) and all(
        getattr(a, k, None) == getattr(b, k, None) for k in ("mean", "std", "sample_rate", "n_mels", "clip_seconds", "mel_mean", "mel_std", "num_frames",
                  "mode", "fps", "span_seconds"))


def make_teacher(cfg, device: torch.device):
    """objectives.distill's teacher: stored embeddings, an open_clip checkpoint or an export."""
    d = cfg.objectives.distill
    if d.teacher == "offline":
        return OfflineTeacher()
    if d.open_clip_model:
        return OpenClipTeacher(d.teacher, d.open_clip_model, cfg, device)
    return Teacher(d.teacher, cfg, device)


def distill_terms(out, teacher_embeddings: dict[str, torch.Tensor], teacher_scale: dict[str, float], scales,
                  group=None, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """One term per student pair (`scales`) the teacher has too ("distill/text-image", ...), over
    the rows of every rank in `group` with both sides (`temperature` as distill_loss takes it). Every
    rank gathers the same keys (the student's modalities; zeros where this rank's teacher has none)."""
    from mmpretrain.objectives.infonce import gather_with_grad

    rows = gather_with_grad({**{f"s/{m}": e for m, e in out.embeddings.items()},
                             **{f"t/{m}": teacher_embeddings.get(m, torch.zeros_like(e)).to(e.dtype)
                                for m, e in out.embeddings.items()},
                             **{f"has/{m}": p.float() for m, p in out.present.items()}}, group)
    terms = {}
    for pair, param in scales.items():
        a, b = pair.split("-")
        if pair not in teacher_scale or not {a, b} <= teacher_embeddings.keys():
            continue
        both = (rows[f"has/{a}"] * rows[f"has/{b}"]).bool()
        if int(both.sum()) < 2:
            continue
        terms[f"distill/{pair}"] = distill_loss(rows[f"s/{a}"][both], rows[f"s/{b}"][both], param.exp(),
                                                rows[f"t/{a}"][both], rows[f"t/{b}"][both], teacher_scale[pair],
                                                temperature)
    return terms
