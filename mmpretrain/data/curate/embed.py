"""Samples as a model sees them: the shards parsed by training's own SampleParser (evaluation
mode: no augmentation, the first caption), and embedded by an mmpretrain export. The dedup step's
semantic duplicates and the score step's pair quality both read these."""

from __future__ import annotations

import numpy as np
import torch

from mmpretrain.data.curate.core import parsed_samples

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
    """One record per sample of the shard (core.parsed_samples'), with "media": {modality: (E,)
    float32} and "text": (E,) (`text`: the first caption embedded too) where it parsed."""
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

    for record, parsed, _ in parsed_samples(url, caption_keys, keep, parser):
        records.append(record)
        if parsed is None:
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
