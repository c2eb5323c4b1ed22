"""Samples as a model sees them: the shards parsed by training's own SampleParser (evaluation
mode: no augmentation, the first caption), and embedded by an mmpretrain export. The dedup step's
semantic duplicates and the score step's pair quality both read these."""

from __future__ import annotations

import random

import numpy as np
import torch

from mmpretrain.data.curate.core import read_shard

_LOADED: dict[str, object] = {}  # export folder -> Pretrained, once per worker process


def pretrained(export: str):
    from mmpretrain.pretrained import load_pretrained

    if export not in _LOADED:
        _LOADED[export] = load_pretrained(export)
    return _LOADED[export]


def parser_for(model_cfg, caption_keys: list[str], tokenizer):
    """Training's SampleParser in evaluation mode for a model's modalities."""
    from mmpretrain.config import Config
    from mmpretrain.data.samples import SampleParser

    cfg = Config()
    cfg.model = model_cfg
    cfg.data.caption_keys = list(caption_keys)
    return SampleParser(cfg, False, tokenizer)


@torch.no_grad()
def embed_shard(url: str, export: str, caption_keys: list[str], keep: frozenset[str] | None,
                text: bool, batch_size: int = 64) -> list[dict]:
    """One record per sample of the shard: {"key", "shard", "caption", "media": {modality: (E,)
    float32}, "text": (E,) or absent}, or {"key", "shard", "caption", "bad": (reason, detail)} for
    one training would skip. `text`: embed the (first) caption too."""
    from mmpretrain.data.samples import DOC_KEY, BadSample

    model = pretrained(export)
    parser = parser_for(model.cfg, caption_keys, model.tokenizer)
    records, pending = [], []

    def flush():
        if not pending:
            return
        for m in parser.specs:
            rows = [(r, p[m]) for r, p in pending if m in p]
            if rows:
                emb = model.model.encode_media(m, torch.stack([x for _, x in rows]))[1].float().numpy()
                for (r, _), e in zip(rows, emb):
                    r["media"][m] = e
        if text:
            tokens = torch.stack([p["tokens"] for _, p in pending])
            lengths = torch.tensor([p["length"] for _, p in pending])
            for (r, _), e in zip(pending, model.model.encode_text(tokens, lengths).float().numpy()):
                r["text"] = e
        pending.clear()

    for s in read_shard(url, caption_keys, keep):
        record = {"key": s.key, "shard": s.shard, "caption": s.captions[0] if s.captions else ""}
        records.append(record)
        if s.bad:
            record["bad"] = s.bad
            continue
        if DOC_KEY in s.members:
            record["bad"] = ("document", "an interleaved document: no pair to score")
            continue
        try:
            parsed = parser({"__key__": s.key, **s.members}, random.Random(0))
        except BadSample as e:
            record["bad"] = (e.reason, e.detail)
            continue
        record["media"] = {}
        pending.append((record, parsed))
        if len(pending) == batch_size:
            flush()
    flush()
    return records


def unit(rows: list[np.ndarray]) -> np.ndarray:
    x = np.stack(rows).astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
