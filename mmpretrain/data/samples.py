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
import re

from mmpretrain.batch import BadSample
from mmpretrain.config import Config

log = logging.getLogger(__name__)

DOC_KEY = "doc.json"  # marks an interleaved document (see SampleParser.document)


# "<_io.BytesIO object at 0x7f..>", " @ <_io.BufferedReader name='a.tar'>": what PIL, tarfile and
# webdataset put in their messages, which say nothing to a reader of the log
_OBJECT_REPR = re.compile(r"(\s+@)?\s*<[A-Za-z_][\w.]* [^<>]*>")


def plain(text: str) -> str:
    """`text` without object reprs."""
    return _OBJECT_REPR.sub("", str(text)).strip()


def describe(e: BaseException) -> str:
    """An exception as one plain line: its type and message. Webdataset appends the stream and the
    URL to the args of what it passes its handler, so the first arg is the message."""
    msg = plain(str(e) if isinstance(e, OSError) or len(e.args) < 2 else e.args[0])
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def tar_error_shard(e: BaseException) -> str | None:
    """The shard of a tar error webdataset passes its handler: the URL it appends to the args, or
    the file named by the stream it appends to the message ("... @ <_io.BufferedReader name='a.tar'>")."""
    if len(e.args) > 1 and isinstance(e.args[-1], str):
        return e.args[-1]
    found = re.search(r" @ <[\w.]+ name='([^']*)'>", str(e.args[0]) if e.args else "")
    return found.group(1) if found else None


class SkipCounter:
    """Per-process tally of skipped samples by reason, with rate-limited logging that names the
    shard and the key. `keep`: also list every skip in `bad` (for inspect)."""

    def __init__(self, max_logs: int, keep: bool = False):
        self.max_logs, self.keep = max_logs, keep
        self.total = collections.Counter()
        self.pending = collections.Counter()
        self.bad: list[dict] = []  # {"shard", "key", "reason", "detail"}; key None for a tar error

    def __call__(self, reason: str, detail: str = "", raw: dict | None = None,
                 shard: str | None = None) -> bool:
        """A skipped sample `raw` (its __url__ and __key__ name it), or tar data of `shard`."""
        key = raw.get("__key__") if raw else None
        shard = raw.get("__url__") if raw else shard
        detail = plain(detail)[:200]
        self.total[reason] += 1
        self.pending[reason] += 1
        if self.keep:
            self.bad.append({"shard": shard, "key": key, "reason": reason, "detail": detail})
        if self.total[reason] <= self.max_logs:
            suffix = " (further ones are counted, not logged)" if self.total[reason] == self.max_logs else ""
            what, where = ("a sample", f"{shard}, key {key}") if key else ("tar data", shard or "a shard")
            tail = f": {detail}" if detail else ""
            log.warning("skipping %s (%s): %s%s%s", what, reason, where, tail, suffix)
        return True  # webdataset handlers: True means continue

    def bad_tar(self, e: BaseException) -> bool:
        """webdataset's handler for what it cannot read: a shard that is missing, not a tar, cut short."""
        return self("bad_tar", describe(e), shard=tar_error_shard(e))

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
    raise BadSample("missing_text", f"none of data.caption_keys {keys} "
                                    f"(members: {sorted(k for k in raw if not k.startswith('__'))})")


class SampleParser:
    """Raw sample -> {"__key__", "tokens", "length", "captions", <modality>: tensor, ...} for the
    model's modalities, or {"__key__", "document"}; text is tokenized once, here."""

    def __init__(self, cfg: Config, train: bool, tokenizer):
        # here, not at the top: the captions' readers (curate filter) load no decoder library
        from mmpretrain.encoders import MODALITIES

        self.cfg, self.train, self.tokenizer = cfg, train, tokenizer
        self.caption_keys = cfg.data.caption_keys
        # registry order, which fixes the order in which media draw from the sample's RNG
        self.specs = {m: spec for m, spec in MODALITIES.items() if m in cfg.model.modalities}
        self.sections = {m: spec.section(cfg.model) for m, spec in self.specs.items()}
        self.extras = [spec.extras for spec in MODALITIES.values() if spec.extras is not None]
        # objectives.distill.teacher=offline: training reads teacher.npz members (evaluation never)
        self.offline_teacher = train and cfg.objectives.distill.teacher == "offline"

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
        for extras in self.extras:  # media a modality derives from members (a video's audio track)
            out.update(extras(raw, out, self.cfg, rng if self.train else None))
        if not any(m in out for m in self.specs):
            raise BadSample("no_media", f"none of {list(self.specs)} "
                                        f"(members: {sorted(k for k in raw if not k.startswith('__'))})")
        if self.offline_teacher:
            out["teacher"] = self.teacher(raw, captions, captions.index(text))
        return out

    def teacher(self, raw: dict, captions: list[str], chosen: int) -> dict:
        """objectives.distill.teacher=offline: the stored teacher embeddings of this sample's
        chosen caption and its media (data/teacher_embed.py)."""
        from mmpretrain.data.teacher_embed import MEMBER, read_member

        if MEMBER not in raw:
            raise BadSample("missing_teacher", f"no {MEMBER} in the sample or a sidecar beside its shard "
                                                 f"(python -m mmpretrain.data.teacher_embed writes them)")
        try:
            out, rows = read_member(raw[MEMBER], chosen, list(self.specs))
        except Exception as e:  # NumPy raises many types for a bad archive
            raise BadSample("bad_teacher", repr(e)) from e
        if rows != len(captions):
            raise BadSample("bad_teacher", f"{rows} teacher caption embeddings for {len(captions)} captions "
                                           f"(embedded with other caption keys?)")
        return out

    def media(self, modality: str, data: bytes, rng: random.Random):
        return self.specs[modality].decode(data, self.sections[modality], rng if self.train else None)

    def document(self, raw: dict, rng: random.Random) -> list[tuple[str, object]]:
        """`doc.json` {"interleaved": [{"text": str} | {<modality>: member}, ...]}
        -> [("text", str) | (modality, tensor), ...]; media of other modalities are dropped."""
        from mmpretrain.encoders import MODALITIES

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
