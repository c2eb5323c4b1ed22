"""Caption filters: token length, repeats, alt-text boilerplate, a blocklist, language, a classifier.

A sample is removed for the first filter it fails, in this order (cheap ones first; the classifier
last, so it scores only what the others kept). Every caption of a sample must pass: training draws
any of them. Each filter is a removal reason:

    too_short, too_long  --min-tokens N / --max-tokens N: fewer / more BPE tokens than N, as the
                         training tokenizer counts them (--tokenizer, model.text.tokenizer's default),
                         sot and eot not counted, before truncation to the context length
    repeated             --max-repeat N: a character repeated more than N times in a row ("!!!!!!",
                         "soooooo"; whitespace and digits do not count: "1000000" passes), or the
                         same word more than N times in a row ("buy buy buy buy")
    boilerplate          alt-text boilerplate, regexes matched case-insensitively: a default list
                         (BOILERPLATE: "click to enlarge", "stock photo", "free download", "image
                         may contain", "no description available", camera file names like IMG_1234
                         or DSC01234, ...), on unless --no-default-boilerplate, plus --boilerplate
                         FILE (a regex a line)
    blocklist            --blocklist FILE: words or phrases, one a line, matched case-insensitively
                         on word boundaries ("ass" blocks "ass", not "class"); the library ships no
                         word list of its own
    language             --lang en [de ...]: langid.py's guess (its model ships in the package) is
                         not one of these; detail: the guess and its probability. langid guesses
                         poorly on a few words, so captions shorter than --lang-min-chars (default
                         20) characters are not checked
    classifier           --classifier module:function --classifier-threshold T: the function takes a
                         list of captions and returns one float each (a toxicity score, say); a
                         sample scoring above T (its highest-scoring caption) is removed

The step reads captions alone: media members are skipped unread and no media decoder is loaded,
so a worker starts with the tokenizer alone (about half the start-up of one importing the decoders).

At least one filter is needed: the default boilerplate list counts, so --no-default-boilerplate
alone is an error. The report has the removals per filter and a summary of the captions' token
lengths.

A local detoxify checkpoint through the hook (detoxify is no dependency of this library; install
it, and give it a local `huggingface_config_path` too when offline), in a module on PYTHONPATH, then
`--classifier mytox:toxicity --classifier-threshold 0.5`:

    # mytox.py
    import functools
    import detoxify

    @functools.cache  # once per worker process, not once per shard
    def _model():
        return detoxify.Detoxify("original", checkpoint="toxic_original-c1212f89.ckpt", device="cpu")

    def toxicity(captions: list[str]) -> list[float]:
        return [float(s) for s in _model().predict(captions)["toxicity"]]
"""

from __future__ import annotations

import argparse
import functools
import importlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmpretrain.config import ConfigError, TextConfig
from mmpretrain.data.curate import core

ORDER = ("too_short", "too_long", "repeated", "boilerplate", "blocklist", "language", "classifier")
BOILERPLATE = (
    r"\bclick (?:here )?to (?:enlarge|zoom|view|see)\b",
    r"\bview (?:larger|full[- ]size)\b",
    r"\bstock (?:photo|image|picture|photography|footage|illustration|vector)s?\b",
    r"\broyalty[- ]free\b",
    r"\bfree download\b|\bdownload (?:free|now)\b",
    r"\bimage may contain\b",
    r"\bno (?:description|caption|alt(?:ernative)? text) (?:is )?available\b",
    r"\b(?:image|photo|picture) not (?:found|available)\b",
    r"\b(?:shutterstock|getty ?images|istock(?:photo)?|alamy|dreamstime|depositphotos|123rf)\b",
    r"\b(?:IMG|DSC|DSCN|DSCF|PXL|MVIMG|GOPR|SAM|VID)[_-]?\d{3,}",  # camera file names
    r"^\S+\.(?:jpe?g|png|gif|webp|bmp|tiff?)$",  # a bare file name as the caption
)
CLASSIFIER_BATCH = 256  # captions per call of the hook
TOKEN_BINS = (4, 8, 16, 32, 64)  # the token-length histogram's bin tops


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-tokens", type=int, default=None, metavar="N",
                   help="remove captions of fewer tokens")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N", help="remove captions of more tokens")
    p.add_argument("--tokenizer", default=TextConfig().tokenizer,
                   help=f"the training run's model.text.tokenizer (default {TextConfig().tokenizer})")
    p.add_argument("--max-repeat", type=int, default=None, metavar="N",
                   help="remove captions with a character or word repeated more than N times in a row")
    p.add_argument("--boilerplate", default=None, metavar="FILE", help="more boilerplate regexes, one a line")
    p.add_argument("--no-default-boilerplate", action="store_true", help="drop the default boilerplate list")
    p.add_argument("--blocklist", default=None, metavar="FILE", help="words or phrases to remove, one a line")
    p.add_argument("--lang", nargs="+", default=None, metavar="CODE",
                   help="keep these languages (langid codes: en de ...)")
    p.add_argument("--lang-min-chars", type=int, default=20, metavar="N",
                   help="captions shorter than this are not language-checked (default 20)")
    p.add_argument("--classifier", default=None, metavar="MODULE:FUNCTION",
                   help="a function of a list of captions -> a list of floats")
    p.add_argument("--classifier-threshold", type=float, default=None, metavar="T",
                   help="remove samples the classifier scores above T")


@dataclass(frozen=True)
class Filters:
    """The filters asked for, built in the main process (files read, regexes compiled), picklable."""

    min_tokens: int | None
    max_tokens: int | None
    tokenizer: str
    repeat: tuple[re.Pattern, re.Pattern] | None  # (a character, a word) repeated more than N times
    boilerplate: tuple[re.Pattern, ...]
    blocklist: re.Pattern | None
    langs: frozenset[str] | None
    lang_min_chars: int
    classifier: str | None
    threshold: float | None

    def active(self) -> list[str]:
        given = (self.min_tokens is not None, self.max_tokens is not None, self.repeat is not None,
                 bool(self.boilerplate), self.blocklist is not None, self.langs is not None,
                 self.classifier is not None)
        return [reason for reason, on in zip(ORDER, given) if on]


def check(a: argparse.Namespace) -> None:
    _filters(a)


def _filters(a: argparse.Namespace) -> Filters:
    for flag, v, least in (("--min-tokens", a.min_tokens, 1), ("--max-tokens", a.max_tokens, 1),
                           ("--max-repeat", a.max_repeat, 1), ("--lang-min-chars", a.lang_min_chars, 0)):
        if v is not None and v < least:
            raise ConfigError(f"{flag} {v}: expected at least {least}")
    if a.min_tokens is not None and a.max_tokens is not None and a.min_tokens > a.max_tokens:
        raise ConfigError(f"--min-tokens {a.min_tokens} is above --max-tokens {a.max_tokens}")
    if (a.classifier is None) != (a.classifier_threshold is None):
        raise ConfigError("--classifier and --classifier-threshold go together: give both or neither")
    if a.classifier is not None:
        _classifier(a.classifier)
    if a.lang is not None:
        unknown = sorted(set(a.lang) - set(_langid().nb_classes))
        if unknown:
            raise ConfigError(f"--lang {' '.join(unknown)}: not a langid language code "
                              f"(one of {' '.join(sorted(_langid().nb_classes))})")
    n = a.max_repeat
    f = Filters(a.min_tokens, a.max_tokens, a.tokenizer,
                None if n is None else (re.compile(rf"([^\s\d])\1{{{n},}}"),
                                        re.compile(rf"\b(\w+)(?:\W+\1\b){{{n},}}", re.IGNORECASE)),
                tuple(re.compile(p, re.IGNORECASE) for p in (() if a.no_default_boilerplate else BOILERPLATE))
                + _regexes(a.boilerplate),
                _blocklist(a.blocklist), None if a.lang is None else frozenset(a.lang), a.lang_min_chars,
                a.classifier, a.classifier_threshold)
    if not f.active():
        raise ConfigError("filter: no filter given (--min-tokens, --max-tokens, --max-repeat, --boilerplate, "
                          "--blocklist, --lang, --classifier; or drop --no-default-boilerplate)")
    return f


def _lines(path: str, flag: str) -> list[tuple[int, str]]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{flag} {path!r}: not found")
    text = p.read_text(encoding="utf-8")
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise ConfigError(f"{flag} {path!r}: is empty (expected one entry a line)")
    return lines


def _regexes(path: str | None) -> tuple[re.Pattern, ...]:
    out = []
    for n, line in _lines(path, "--boilerplate") if path else ():
        try:
            out.append(re.compile(line, re.IGNORECASE))
        except re.error as e:
            raise ConfigError(f"--boilerplate {path}:{n}: {line!r} is not a regex ({e})") from None
    return tuple(out)


def _blocklist(path: str | None) -> re.Pattern | None:
    """One regex of every entry, each between non-word characters (lookarounds, not \\b, so an
    entry may begin or end with punctuation), any whitespace inside a phrase matching any, longest
    first (the detail names the phrase, not a word of it)."""
    if path is None:
        return None
    entries = sorted({r"\s+".join(map(re.escape, line.split())) for _, line in _lines(path, "--blocklist")},
                     key=lambda e: (-len(e), e))
    return re.compile(rf"(?<!\w)(?:{'|'.join(entries)})(?!\w)", re.IGNORECASE)


@functools.cache
def _classifier(spec: str):
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"--classifier {spec!r}: expected module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ConfigError(f"--classifier {spec!r}: cannot import {module!r} ({e})") from None
    except AttributeError:
        raise ConfigError(f"--classifier {spec!r}: module {module!r} has no {name!r}") from None
    if not callable(fn):
        raise ConfigError(f"--classifier {spec!r}: {name!r} is not a function")
    return fn


@functools.cache
def _langid():
    """langid.py's identifier with probabilities (its bare classify gives an unnormalised log score)."""
    from langid.langid import LanguageIdentifier, model

    return LanguageIdentifier.from_modelstring(model, norm_probs=True)


@functools.cache
def _tokenizer(name: str):
    from mmpretrain.tokenizer import Tokenizer

    return Tokenizer(TextConfig(tokenizer=name))


def run(urls: list[str], a: argparse.Namespace, keep: frozenset[str] | None) -> core.Outcome:
    f = _filters(a)
    per_shard = core.map_shards(functools.partial(_job, caption_keys=a.caption_keys, keep=keep, f=f), urls,
                                a.workers, progress=sys.stderr.isatty(), what="filter")
    rows = core.flatten(rows for rows, _ in per_shard)
    tokens = np.concatenate([t for _, t in per_shard])
    removed = [r for _, r in rows if r is not None]
    by_filter = {reason: sum(r["reason"] == reason for r in removed) for reason in f.active()}
    return core.Outcome("filter", [key for key, r in rows if r is None], removed,
                        {"filters": f.active(), "removed_by_filter": by_filter,
                         "caption_tokens": _token_summary(tokens)})


def _job(url: str, caption_keys: list[str], keep: frozenset[str] | None,
         f: Filters) -> tuple[list, np.ndarray]:
    """One shard -> ([(key, its removal or None)] in order, the token count of every caption)."""
    tok = _tokenizer(f.tokenizer)
    rows, lengths, scored = [], [], []
    for s in core.read_shard(url, caption_keys, keep, media=False):  # captions alone: nothing decoded
        if s.bad is not None:
            rows.append([s.key, core.removal(s, *s.bad)])
            continue
        counts = [len(tok.encode(c)) for c in s.captions]
        lengths += counts
        verdict = _verdict(s.captions, counts, f)
        rows.append([s.key, verdict and core.removal(s, *verdict)])
        if verdict is None and f.classifier is not None:
            scored.append((rows[-1], s))
    if scored:
        for (row, s), score in zip(scored, _scores([s.captions for _, s in scored], f.classifier)):
            if score > f.threshold:
                row[1] = core.removal(s, "classifier", f"score {score:.4g} > {f.threshold:g}")
    return [tuple(r) for r in rows], np.array(lengths, dtype=np.int32)


def _verdict(captions: list[str], counts: list[int], f: Filters) -> tuple[str, str] | None:
    """(reason, detail) of the first filter a caption fails, the classifier aside; None: all pass."""
    def which(i: int) -> str:  # removal() shows the first caption: name another that failed
        return f"caption {i + 1} {captions[i][:60]!r}: " if i else ""

    for i, n in enumerate(counts):
        if f.min_tokens is not None and n < f.min_tokens:
            return "too_short", f"{which(i)}{n} tokens < {f.min_tokens}"
    for i, n in enumerate(counts):
        if f.max_tokens is not None and n > f.max_tokens:
            return "too_long", f"{which(i)}{n} tokens > {f.max_tokens}"
    for i, c in enumerate(captions):
        if f.repeat and (m := f.repeat[0].search(c) or f.repeat[1].search(c)):
            return "repeated", f"{which(i)}{m.group(0)[:40]!r}"
    for i, c in enumerate(captions):
        if m := next((m for p in f.boilerplate if (m := p.search(c))), None):
            return "boilerplate", f"{which(i)}{m.group(0)!r}"
    for i, c in enumerate(captions):
        if f.blocklist and (m := f.blocklist.search(c)):
            return "blocklist", f"{which(i)}{m.group(0)!r}"
    for i, c in enumerate(captions):
        if f.langs is not None and len(c) >= f.lang_min_chars:
            lang, p = _langid().classify(c)
            if lang not in f.langs:
                return "language", f"{which(i)}{lang} {p:.2f}"
    return None


def _scores(per_sample: list[list[str]], spec: str) -> list[float]:
    """The classifier's highest score over each sample's captions, CLASSIFIER_BATCH captions a call."""
    fn, flat = _classifier(spec), [c for captions in per_sample for c in captions]
    scores = []
    for i in range(0, len(flat), CLASSIFIER_BATCH):
        batch = flat[i:i + CLASSIFIER_BATCH]
        out = list(fn(batch))
        if len(out) != len(batch):
            raise ConfigError(f"--classifier {spec}: returned {len(out)} scores for {len(batch)} captions")
        scores += [float(s) for s in out]
    it = iter(scores)
    return [max(next(it) for _ in captions) for captions in per_sample]


def _token_summary(tokens: np.ndarray) -> dict | None:
    """Quantiles and a histogram (bins up to each of TOKEN_BINS, then above the last) of caption lengths."""
    if not len(tokens):
        return None
    q = np.quantile(tokens, [0, 0.1, 0.5, 0.9, 1])
    edges = (-1, *TOKEN_BINS)
    hist = {f"{lo + 1}-{hi}": int(((tokens > lo) & (tokens <= hi)).sum()) for lo, hi in zip(edges, edges[1:])}
    hist[f">{TOKEN_BINS[-1]}"] = int((tokens > TOKEN_BINS[-1]).sum())
    return {"captions": int(len(tokens)), "mean": round(float(tokens.mean()), 2),
            **dict(zip(("min", "p10", "median", "p90", "max"), (float(v) for v in q))), "histogram": hist}
