"""Where the shards are: patterns (brace expansion) and the built-in demo corpora -> shard URLs."""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass
class Source:
    """A resolved training source: its name in metrics, its weight in the mix, its shard URLs."""

    name: str
    weight: float
    urls: list[str]


def as_sources(urls_or_sources: list) -> list[Source]:
    """Shard URLs (one source) or `Source`s -> `Source`s."""
    if urls_or_sources and isinstance(urls_or_sources[0], Source):
        return list(urls_or_sources)
    return [Source("all", 1.0, list(urls_or_sources))]


def _pattern(data: DataConfig, p: str, split: str) -> str:
    if p in ("demo", "demo-docs"):  # the built-in corpus: this role's split, or its documents
        from mmpretrain.data.demo import demo_corpus

        splits = demo_corpus(data.demo.cache_dir, data.demo.variants_per_concept, data.demo.seed)
        return splits[split if p == "demo" else "docs"]
    if p == "demo-video":  # the built-in video corpus (clips with audio tracks and stills)
        from mmpretrain.data.demo_video import demo_video_corpus

        return demo_video_corpus(data.demo.cache_dir, data.demo.variants_per_concept, data.demo.seed)[split]
    if p == "demo-relations":  # two objects and where they are: binding and order (images only)
        from mmpretrain.data.demo_relations import demo_relations_corpus

        return demo_relations_corpus(data.demo.cache_dir, seed=data.demo.seed)[split]
    return p


def train_sources(data: DataConfig) -> list[Source]:
    """`data.sources` resolved: one `Source` per entry (weight 0 entries left out)."""
    return [Source(s.label, s.weight, expand([_pattern(data, s.pattern, "train")], f"data.sources[{i}]"))
            for i, s in enumerate(data.sources) if s.weight > 0]


def resolve_sources(data: DataConfig, split: str) -> list[str]:
    """Shard URLs for `split` ("train": every training source's, or "eval"): expands braces,
    resolves "demo"."""
    if split == "train":
        return [u for source in train_sources(data) for u in source.urls]
    return expand([_pattern(data, p, split) for p in data.eval_sources], "data.eval_sources")
