"""Caption and document tokenization: open_clip's BPE tokenizer (it ships its vocabulary, so it works offline)."""

from __future__ import annotations

import functools
import importlib.util
import sys

import torch

from mmpretrain.config import TextConfig


class Tokenizer:
    """Captions as `[sot] text [eot] pad pad ...`, truncated with eot kept: open_clip's
    `SimpleTokenizer` (model.text.tokenizer=openclip), or a Hugging Face tokenizer
    (hf:<folder>), with its BOS as sot, its EOS as eot and its pad (else EOS) as padding."""

    def __init__(self, cfg: TextConfig):
        self.context_length = cfg.context_length
        if cfg.tokenizer.startswith("hf:"):
            self._bpe = HFTokenizer(cfg.tokenizer[3:])
            self.pad_id = self._bpe.pad_id
        else:
            self._bpe = _simple_tokenizer()(context_length=cfg.context_length)
            self.pad_id = 0
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
        tokens = torch.full((len(rows), self.context_length), self.pad_id, dtype=torch.long)
        for i, ids in enumerate(rows):
            tokens[i, : len(ids)] = torch.tensor(ids)
        return tokens, torch.tensor([len(ids) for ids in rows])

    def encode(self, text: str) -> list[int]:
        """Ids without sot/eot or truncation (document text segments)."""
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


class HFTokenizer:
    """A Hugging Face tokenizer folder through the `tokenizers` library (its tokenizer.json), in
    SimpleTokenizer's terms. The special tokens are the model's: BOS / EOS / pad named by
    tokenizer_config.json, else by config.json's ids; no BOS (Qwen2): EOS begins a caption too;
    no pad: EOS pads (padding is never attended: captions carry their lengths)."""

    def __init__(self, folder: str):
        from pathlib import Path

        from tokenizers import Tokenizer as Fast

        folder = Path(folder).expanduser()
        self.tok = Fast.from_file(str(folder / "tokenizer.json"))
        named = _read_json(folder / "tokenizer_config.json")
        ids = _read_json(folder / "config.json")

        def special(name: str) -> int | None:
            token = named.get(f"{name}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if token is not None and (i := self.tok.token_to_id(token)) is not None:
                return i
            i = ids.get(f"{name}_token_id")
            return i[0] if isinstance(i, list) else i

        self.eot_token_id = special("eos")
        if self.eot_token_id is None:
            raise ValueError(f"model.text.tokenizer: {folder} names no EOS token (tokenizer_config.json "
                             f"eos_token or config.json eos_token_id); captions need one to end")
        self.sot_token_id = special("bos")
        self.sot_token_id = self.eot_token_id if self.sot_token_id is None else self.sot_token_id
        pad = special("pad")
        self.pad_id = self.eot_token_id if pad is None else pad
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def _read_json(path) -> dict:
    import json

    return json.loads(path.read_text()) if path.is_file() else {}


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
