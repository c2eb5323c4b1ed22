"""Where the shards are: patterns (brace expansion) and the built-in demo corpora -> shard URLs."""

from __future__ import annotations

from pathlib import Path

import braceexpand

from mmpretrain.config import ConfigError, DataConfig


def expand(patterns: list[str], what: str) -> list[str]:
    """Brace-expand shard patterns; local shards must be readable files. `what` names them in errors."""
    urls = [u for p in patterns for u in braceexpand.braceexpand(p) if u.strip()]
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        raise ConfigError(f"{what}: {len(missing)} of {len(urls)} shard(s) not found, e.g. {missing[0]!r}")
    if not urls:
        raise ConfigError(f"{what}: {patterns} names no shards")
    return urls


def resolve_sources(data: DataConfig, split: str) -> list[str]:
    """Shard URLs for `split` ("train" or "eval"): expands braces, resolves "demo"."""
    key = "data.sources" if split == "train" else "data.eval_sources"
    patterns = []
    for p in data.sources if split == "train" else data.eval_sources:
        if p in ("demo", "demo-docs"):  # the built-in corpus: this role's split, or its documents
            from mmpretrain.data.demo import demo_corpus

            splits = demo_corpus(data.demo.cache_dir, data.demo.variants_per_concept, data.demo.seed)
            p = splits[split if p == "demo" else "docs"]
        elif p == "demo-video":  # the built-in video corpus (clips with audio tracks and stills)
            from mmpretrain.data.demo_video import demo_video_corpus

            p = demo_video_corpus(data.demo.cache_dir, data.demo.variants_per_concept, data.demo.seed)[split]
        patterns.append(p)
    return expand(patterns, key)
