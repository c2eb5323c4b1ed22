"""Raw WebDataset samples (bytes by extension) -> parsed samples for `batch.collate`.

Only known extensions are read; nothing is ever unpickled from a shard. Every
failure raises `BadSample` with a short reason that `SkipCounter` tallies:
bad data never stops a run, it is skipped, counted by reason and logged at a
limited rate.
"""

from __future__ import annotations

import collections
import json
import logging
import random

from mmpretrain.config import Config
from mmpretrain.encoders import MODALITIES, BadSample
from mmpretrain.encoders.video import decode_audio_track

log = logging.getLogger(__name__)

DOC_KEY = "doc.json"  # marks an interleaved document (see SampleParser.document)


class SkipCounter:
    """Per-process tally of skipped samples by reason, with rate-limited logging."""

    def __init__(self, max_logs: int):
        self.max_logs = max_logs
        self.total = collections.Counter()
        self.pending = collections.Counter()

    def __call__(self, reason: str, detail: str = "") -> bool:
        self.total[reason] += 1
        self.pending[reason] += 1
        if self.total[reason] <= self.max_logs:
            suffix = " (further ones are counted, not logged)" if self.total[reason] == self.max_logs else ""
            log.warning("skipping a sample (%s): %s%s", reason, detail[:200], suffix)
        return True  # webdataset handlers: True means continue

    def take(self) -> dict[str, int]:
        out, self.pending = dict(self.pending), collections.Counter()
        return out


def first_key(sample: dict, exts: tuple[str, ...]) -> str | None:
    return next((e for e in exts if e in sample), None)


def decode_captions(data: bytes) -> list[str]:
    """A `.txt` member -> its captions, one per line (CLIP_benchmark's webdataset layout for
    retrieval sets, which writes a caption's own newlines as a literal backslash-n)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadSample("bad_text", repr(e)) from e
    captions = [line.replace("\\n", " ").strip() for line in text.splitlines()]
    captions = [c for c in captions if c]
    if not captions:
        raise BadSample("empty_text")
    return captions


def json_captions(data: bytes, field: str) -> list[str]:
    """A JSON member's `field` -> its captions (a string, or a list of strings); [] when absent."""
    try:
        value = json.loads(data).get(field)
    except (ValueError, AttributeError):
        return []
    values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [c.replace("\n", " ").strip() for c in values if isinstance(c, str) and c.strip()]


def find_captions(raw: dict, keys: list[str]) -> list[str]:
    """The captions of the first of `keys` (data.caption_keys) the sample has: a member extension
    (one caption per line) or "json:<field>". Raises BadSample("missing_text") when none has any."""
    for key in keys:
        if key.startswith("json:"):
            if "json" in raw and (captions := json_captions(raw["json"], key[5:])):
                return captions
        elif key in raw:
            return decode_captions(raw[key])
    raise BadSample("missing_text", f"{raw.get('__key__', '?')}: none of data.caption_keys {keys} "
                                    f"(members: {sorted(k for k in raw if not k.startswith('__'))})")


class SampleParser:
    """Raw sample -> {"__key__", "tokens", "length", "captions", <modality>: tensor, ...} for the
    model's modalities, or {"__key__", "document"}; text is tokenized once, here."""

    def __init__(self, cfg: Config, train: bool, tokenizer):
        self.train, self.tokenizer = train, tokenizer
        self.caption_keys = cfg.data.caption_keys
        # registry order, which fixes the order in which media draw from the sample's RNG
        self.specs = {m: spec for m, spec in MODALITIES.items() if m in cfg.model.modalities}
        self.sections = {m: spec.section(cfg.model) for m, spec in self.specs.items()}
        self.video_audio = cfg.data.video_audio and "audio" in self.specs

    def media_shapes(self) -> dict[str, tuple]:
        return {m: spec.media_shape(self.sections[m]) for m, spec in self.specs.items()}

    def __call__(self, raw: dict, rng: random.Random) -> dict:
        if DOC_KEY in raw:
            segments = self.document(raw, rng)
            ids = iter(self.tokenizer.document_ids([v for k, v in segments if k == "text"]))
            return {"__key__": raw["__key__"],
                    "document": [(k, next(ids) if k == "text" else v) for k, v in segments]}
        captions = find_captions(raw, self.caption_keys)
        text = rng.choice(captions) if self.train else captions[0]  # a random caption per epoch
        tokens, length = self.tokenizer([text])
        out = {"__key__": raw["__key__"], "tokens": tokens[0], "length": int(length[0]), "captions": captions}
        for m, spec in self.specs.items():
            if ext := first_key(raw, spec.extensions):
                out[m] = self.media(m, raw[ext], rng)
        if self.video_audio and "audio" not in out and (ext := first_key(raw, MODALITIES["video"].extensions)):
            track = decode_audio_track(raw[ext], self.sections["audio"], rng if self.train else None)
            if track is not None:  # no track: the sample simply has no audio
                out["audio"] = track
        if not any(m in out for m in self.specs):
            raise BadSample("no_media", raw["__key__"])
        return out

    def media(self, modality: str, data: bytes, rng: random.Random):
        return self.specs[modality].decode(data, self.sections[modality], rng if self.train else None)

    def document(self, raw: dict, rng: random.Random) -> list[tuple[str, object]]:
        """`doc.json` {"interleaved": [{"text": str} | {<modality>: member}, ...]}
        -> [("text", str) | (modality, tensor), ...]; media of other modalities are dropped."""
        try:
            segments = json.loads(raw[DOC_KEY])["interleaved"]
        except (ValueError, KeyError, TypeError) as e:
            raise BadSample("bad_document", repr(e)) from e
        out = []
        for seg in segments:
            (kind, value), = seg.items() if isinstance(seg, dict) and len(seg) == 1 else [(None, None)]
            if kind == "text" and isinstance(value, str) and value.strip():
                out.append(("text", value.strip()))
            elif kind in self.specs:
                if value not in raw:
                    raise BadSample("bad_document", f"missing member {value!r}")
                out.append((kind, self.media(kind, raw[value], rng)))
            elif kind not in MODALITIES:
                raise BadSample("bad_document", f"segment {seg!r}")
        if not any(k == "text" for k, _ in out):
            raise BadSample("bad_document", "no text segment")
        return out
