"""WebDataset shards -> decoded samples -> `Batch`es, deterministic per (seed, epoch).

The stream is a pure function of (shard list, seed, epoch, rank, worker), so a
resumed run replays the same batches: `BatchStream.state_dict()` records the
epoch and how many batches of it were consumed, and `load_state_dict` skips
that many batches of the same epoch (they are re-read and decoded, which costs
time but needs no extra bookkeeping in the workers).

Bad data never stops a run: unreadable tar members, undecodable media and
missing captions are skipped, counted by reason, logged at a limited rate and
attached to the next batch as `Batch.skipped`.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import random
from pathlib import Path

import braceexpand
import torch
import webdataset as wds

from mmpretrain.config import Config, DataConfig
from mmpretrain.data.batch import Batch, collate
from mmpretrain.data.decode import (AUDIO_EXTS, DOC_KEY, IMAGE_EXTS, TEXT_EXTS, BadSample, decode_audio,
                                    decode_captions, decode_image, first_key, ImagePreprocess)
from mmpretrain.data.demo import demo_corpus
from mmpretrain.parallel import data_parallel

log = logging.getLogger(__name__)


def resolve_sources(data: DataConfig, split: str) -> list[str]:
    """Shard URLs for `split` ("train" or "eval"): expands braces, resolves "demo"."""
    patterns = data.sources if split == "train" else data.eval_sources
    urls = []
    for p in patterns:
        if p in ("demo", "demo-docs"):  # the built-in corpus: this role's split, or its documents
            splits = demo_corpus(data.demo.cache_dir, data.demo.variants_per_concept, data.demo.seed)
            p = splits[split if p == "demo" else "docs"]
        urls.extend(braceexpand.braceexpand(p))
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).exists()]
    if missing:
        raise FileNotFoundError(f"data ({split}): {len(missing)} shard(s) not found, e.g. {missing[0]}")
    if not urls:
        raise ValueError(f"data ({split}): no shards given")
    return urls


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


class SampleDecoder:
    """Raw sample (bytes by extension) -> dict of tensors for the model's modalities, with the
    caption (or a document's text) tokenized once, here."""

    def __init__(self, cfg: Config, train: bool, tokenizer):
        self.cfg, self.train, self.tokenizer = cfg, train, tokenizer
        self.modalities = list(cfg.model.modalities)
        self.image_tf = ImagePreprocess(cfg.model.image, train)

    def __call__(self, raw: dict, rng: random.Random) -> dict:
        if DOC_KEY in raw:
            segments = self.document(raw, rng)
            ids = iter(self.tokenizer.document_ids([v for k, v in segments if k == "text"]))
            return {"__key__": raw["__key__"],
                    "document": [(k, next(ids) if k == "text" else v) for k, v in segments]}
        key = first_key(raw, TEXT_EXTS)
        if key is None:
            raise BadSample("missing_text", raw.get("__key__", "?"))
        captions = decode_captions(raw[key])
        text = rng.choice(captions) if self.train else captions[0]  # a random caption per epoch
        tokens, length = self.tokenizer([text])
        out = {"__key__": raw["__key__"], "tokens": tokens[0], "length": int(length[0]), "captions": captions}
        for m, exts in (("image", IMAGE_EXTS), ("audio", AUDIO_EXTS)):
            if m in self.modalities and (key := first_key(raw, exts)):
                out[m] = self.media(m, raw[key], rng)
        if not any(m in out for m in self.modalities):
            raise BadSample("no_media", raw["__key__"])
        return out

    def media(self, modality: str, data: bytes, rng: random.Random) -> torch.Tensor:
        if modality == "image":
            return self.image_tf(decode_image(data, self.cfg.model.image), rng)
        return decode_audio(data, self.cfg.model.audio, rng if self.train else None)

    def document(self, raw: dict, rng: random.Random) -> list[tuple[str, object]]:
        """`doc.json` {"interleaved": [{"text": str} | {"image": member} | {"audio": member}, ...]}
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
            elif kind in ("image", "audio") and kind in self.modalities:
                if value not in raw:
                    raise BadSample("bad_document", f"missing member {value!r}")
                out.append((kind, self.media(kind, raw[value], rng)))
            elif kind not in ("image", "audio"):
                raise BadSample("bad_document", f"segment {seg!r}")
        if not any(k == "text" for k, _ in out):
            raise BadSample("bad_document", "no text segment")
        return out

    def media_shapes(self) -> dict[str, tuple]:
        a, i = self.cfg.model.audio, self.cfg.model.image
        return {"image": (3, i.image_size, i.image_size),
                "audio": (int(round(a.sample_rate * a.clip_seconds)),)}


class _EpochDataset(torch.utils.data.IterableDataset):
    """One pass over the shards for one epoch, yielding Batches (batched in the worker)."""

    def __init__(self, urls, cfg: Config, tokenizer, batch_size: int, epoch: int, train: bool):
        self.urls, self.cfg, self.tokenizer = urls, cfg, tokenizer
        self.batch_size, self.epoch, self.train = batch_size, epoch, train

    def __iter__(self):
        seed, data = self.cfg.run.seed, self.cfg.data
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rank, world, _ = data_parallel() if self.train else (0, 1, None)  # all ranks evaluate all
        part, parts = rank * workers + worker, world * workers
        skips = SkipCounter(data.max_bad_sample_logs)
        decoder = SampleDecoder(self.cfg, self.train, self.tokenizer)
        urls = list(self.urls)
        if self.train:
            random.Random(f"shards-{seed}-{self.epoch}").shuffle(urls)
        read = wds.tarfile_to_samples(handler=lambda e: skips("bad_tar", repr(e)))
        if len(urls) >= parts:  # each rank/worker reads its own shards
            stages = [wds.SimpleShardList(urls[part::parts]), read]
        else:  # fewer shards than readers: all read everything and keep every parts-th sample
            stages = [wds.SimpleShardList(urls), read, lambda src: itertools.islice(src, part, None, parts)]
        if self.train and data.shuffle_buffer > 1:
            rng = random.Random(f"samples-{seed}-{self.epoch}-{rank}-{worker}")
            stages.append(wds.shuffle(data.shuffle_buffer, min(100, data.shuffle_buffer), rng=rng))
        budget = data.max_tokens if self.train else 0
        pending, used = [], 0
        for raw in wds.DataPipeline(*stages):
            key = raw.get("__key__", "?")
            try:
                sample = decoder(raw, random.Random(f"{seed}-{self.epoch}-{key}"))
            except BadSample as e:
                skips(e.reason, f"{key}: {e}")
                continue
            if budget:  # close the row before the sample that would overflow it
                need = self.decoder_tokens(sample)
                if need > budget:
                    skips("over_token_budget", f"{key}: {need} tokens > data.max_tokens={budget}")
                    continue
                if used + need > budget:
                    yield self._collate(pending, decoder, skips)
                    pending, used = [], 0
                used += need
            pending.append(sample)
            if len(pending) == self.batch_size:
                yield self._collate(pending, decoder, skips)
                pending, used = [], 0
        if pending and not self.train:  # eval keeps every sample; train keeps shapes fixed
            yield self._collate(pending, decoder, skips)

    def decoder_tokens(self, sample: dict) -> int:
        """Tokens the sample adds to the packed decoder row: its caption alone, and its media
        tokens (every modality present) followed by the caption again."""
        latents = self.cfg.model.fusion.num_latents
        if "document" in sample:  # text segments (sot and eot included) and each media item's tokens
            return sum(len(v) if k == "text" else latents for k, v in sample["document"])
        return 2 * sample["length"] + sum(m in sample for m in self.cfg.model.modalities) * latents

    def _collate(self, samples, decoder, skips) -> Batch:
        batch = collate(samples, decoder.modalities, decoder.media_shapes(), self.tokenizer.context_length)
        batch.skipped = skips.take()
        return batch


def _loader(dataset, num_workers: int):
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                       persistent_workers=False)


class BatchStream:
    """An endless, resumable iterator of training batches over repeated epochs."""

    def __init__(self, urls: list[str], cfg: Config, tokenizer, batch_size: int):
        self.urls, self.cfg, self.tokenizer, self.batch_size = urls, cfg, tokenizer, batch_size
        self.epoch, self.batch_in_epoch = 0, 0
        self.skipped = collections.Counter()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]

    def __iter__(self):
        while True:
            ds = _EpochDataset(self.urls, self.cfg, self.tokenizer, self.batch_size, self.epoch, True)
            produced = 0
            for i, batch in enumerate(_loader(ds, self.cfg.data.num_workers)):
                produced += 1
                self.skipped.update(batch.skipped)
                if i < self.batch_in_epoch:  # replaying a resumed epoch
                    continue
                self.batch_in_epoch = i + 1
                yield batch
            if produced == 0:
                raise RuntimeError(f"an epoch over {len(self.urls)} shard(s) produced no full batch of "
                                   f"{self.batch_size}: too little (readable) data for this batch size")
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0


def eval_batches(urls: list[str], cfg: Config, tokenizer, batch_size: int = 256):
    """One deterministic pass over eval shards (no shuffle, eval transforms, last batch kept)."""
    ds = _EpochDataset(urls, cfg, tokenizer, batch_size, epoch=0, train=False)
    return _loader(ds, cfg.data.num_workers)
