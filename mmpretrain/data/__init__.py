"""The data pipeline: shard sources, sample parsing, the resumable batch stream, the demo corpus."""

from mmpretrain.data.sources import resolve_sources
from mmpretrain.data.stream import BatchStream, eval_batches

__all__ = ["BatchStream", "eval_batches", "resolve_sources"]
