"""Caption and document tokenization: open_clip's BPE tokenizer (it ships its vocabulary, so it works offline)."""

from __future__ import annotations

import functools
import importlib.util
import sys

import torch

from mmpretrain.config import TextConfig


class Tokenizer:
    """Wraps open_clip's `SimpleTokenizer`: `[sot] text [eot] 0 0 ...`, truncated with eot kept."""

    pad_id = 0

    def __init__(self, cfg: TextConfig):
        self.context_length = cfg.context_length
        self._bpe = _simple_tokenizer()(context_length=cfg.context_length)
        self.sot_id = self._bpe.sot_token_id
        self.eot_id = self._bpe.eot_token_id
        self.vocab_size = self._bpe.vocab_size
        # Per instance (so per DataLoader worker), bounded: cleaning and BPE cost about 0.1 ms a
        # caption, most of a small image's whole data path, and captions recur every epoch
        self._caption_ids = functools.lru_cache(maxsize=1 << 16)(self._ids)

    def _ids(self, text: str) -> tuple[int, ...]:
        """open_clip's `SimpleTokenizer.__call__` for one text: sot, BPE, eot, truncated keeping eot
        (its call takes a batch and returns a tensor, so it cannot be cached per caption)."""
        ids = [self.sot_id, *self._bpe.encode(text), self.eot_id]
        if len(ids) > self.context_length:
            ids = ids[: self.context_length - 1] + [self.eot_id]
        return tuple(ids)

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> tokens (B, context_length) int64, lengths (B,) counting sot and eot."""
        rows = [self._caption_ids(t) for t in texts]
        tokens = torch.zeros(len(rows), self.context_length, dtype=torch.long)
        for i, ids in enumerate(rows):
            tokens[i, : len(ids)] = torch.tensor(ids)
        return tokens, torch.tensor([len(ids) for ids in rows])

    def encode(self, text: str) -> list[int]:
        """BPE ids without sot/eot or truncation (document text segments)."""
        return self._bpe.encode(text)

    def document_ids(self, texts: list[str]) -> list[torch.Tensor]:
        """Text segments of one document: sot before the first, eot after the last."""
        ids = [self.encode(t) for t in texts]
        ids[0] = [self.sot_id] + ids[0]
        ids[-1] = ids[-1] + [self.eot_id]
        return [torch.tensor(i, dtype=torch.long) for i in ids]

    def decode(self, tokens: torch.Tensor) -> str:
        ids = [t for t in tokens.tolist() if t not in (self.pad_id, self.sot_id, self.eot_id)]
        return self._bpe.decode(ids).strip()


@functools.cache
def _simple_tokenizer() -> type:
    """open_clip's `SimpleTokenizer` class, from its tokenizer module alone. `import open_clip`
    first runs the package's __init__, which imports every model definition and, where transformers
    is installed, transformers: about 3 s of every process's start-up (each torchrun rank's), for
    a module that imports only ftfy, regex, numpy and torch. The package's own import is the
    fallback, should a later open_clip make the module depend on the rest of the package."""
    if "open_clip.tokenizer" in sys.modules:
        return sys.modules["open_clip.tokenizer"].SimpleTokenizer
    try:
        path = importlib.util.find_spec("open_clip").submodule_search_locations[0] + "/tokenizer.py"
        spec = importlib.util.spec_from_file_location("mmpretrain._open_clip_tokenizer", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.SimpleTokenizer
    except ImportError:
        from open_clip.tokenizer import SimpleTokenizer

        return SimpleTokenizer
