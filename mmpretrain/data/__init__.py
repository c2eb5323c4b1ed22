from mmpretrain.data.batch import Batch, collate
from mmpretrain.data.shards import BatchStream, eval_batches, resolve_sources

__all__ = ["Batch", "BatchStream", "collate", "eval_batches", "resolve_sources"]
