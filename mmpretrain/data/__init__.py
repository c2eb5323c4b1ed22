"""The data pipeline: shard sources, sample parsing, the resumable batch stream, the demo corpus."""

__all__ = ["BatchStream", "eval_batches", "resolve_sources"]


def __getattr__(name: str):
    """The pipeline's names load on first use, so that a tool in a submodule (make_shards, the
    curation steps' workers) does not import the stream and every decoder to start."""
    if name == "resolve_sources":
        from mmpretrain.data.sources import resolve_sources

        return resolve_sources
    if name in ("BatchStream", "eval_batches"):
        from mmpretrain.data import stream

        return getattr(stream, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
