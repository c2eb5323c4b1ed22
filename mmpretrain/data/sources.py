"""Where the shards are: patterns (brace expansion) and the built-in demo corpus -> shard URLs."""

from __future__ import annotations

from pathlib import Path

import braceexpand

from mmpretrain.config import DataConfig


def expand(patterns: list[str], what: str) -> list[str]:
    """Brace-expand shard patterns; local shards must exist. `what` names them in errors."""
    urls = [u for p in patterns for u in braceexpand.braceexpand(p)]
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).exists()]
    if missing:
        raise FileNotFoundError(f"{what}: {len(missing)} shard(s) not found, e.g. {missing[0]}")
    if not urls:
        raise ValueError(f"{what}: no shards given")
    return urls


def resolve_sources(data: DataConfig, split: str) -> list[str]:
    """Shard URLs for `split` ("train" or "eval"): expands braces, resolves "demo"."""
    patterns = []
    for p in data.sources if split == "train" else data.eval_sources:
        if p in ("demo", "demo-docs"):  # the built-in corpus: this role's split, or its documents
            from mmpretrain.data.demo import demo_corpus

            splits = demo_corpus(data.demo.cache_dir, data.demo.variants_per_concept, data.demo.seed)
            p = splits[split if p == "demo" else "docs"]
        patterns.append(p)
    return expand(patterns, f"data ({split})")
