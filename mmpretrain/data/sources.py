"""Where the shards are: patterns (brace expansion) and the built-in demo corpora -> shard URLs,
and the check, before a model is built, that they open and hold a batch."""

from __future__ import annotations

import contextlib
import glob
import itertools
import logging
import os
import subprocess
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from mmpretrain.config import Config, ConfigError, DataConfig
from mmpretrain.data.samples import DOC_KEY

log = logging.getLogger(__name__)

# patterns naming a built-in corpus
DEMO_CORPORA = ("demo", "demo-docs", "demo-video", "demo-relations", "demo-noisy")
# the media every training sample of a built-in corpus holds, with its caption (the others' vary)
FULLY_PAIRED = {"demo": ("image", "audio")}
# those whose eval split holds only combinations their train split never shows: retrieval on them is
# zero-shot. Nothing else says so (an own held-out split is only held out): see `zero_shot`
ZERO_SHOT_CORPORA = ("demo", "demo-video", "demo-relations", "demo-noisy")
URL_TIMEOUT = 10  # seconds an http(s) shard may take to answer the check
MEDIA_SCAN = 1000  # samples per source whose member names are read, at most, for one the model reads


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def expand(patterns: list[str], what: str) -> list[str]:
    """Brace-expand shard patterns (a leading `~` is the home folder); local shards must be
    readable files. `what` names them in errors."""
    given = []
    for p in patterns:
        try:
            given += [u for u in braceexpand.braceexpand(p) if u.strip()]
        except braceexpand.UnbalancedBracesError:
            raise ConfigError(f"{what}: {p!r} has unbalanced braces; a brace pattern reads "
                              f"'train-{{000000..000127}}.tar'") from None
    urls = [os.path.expanduser(u) if is_local(u) else u for u in given]
    missing = [(u, g) for u, g in zip(urls, given) if is_local(u) and not Path(u).is_file()]
    if missing:
        raise ConfigError(f"{what}: {_missing(missing, len(urls))}")
    if not urls:
        raise ConfigError(f"{what}: {patterns} names no shards")
    return urls


def _missing(missing: list[tuple[str, str]], total: int) -> str:
    """What is wrong with the first of the (path, as given) shards that are not files: a glob, a
    folder, or nothing there."""
    path, given = missing[0]

    def example(folder: str, files: list[str]) -> str:
        pattern = brace_pattern(files) if files else os.path.join(folder, "train-{000000..000127}.tar")
        return f"name shards by a brace pattern, e.g. {pattern!r}"

    if glob.has_magic(path):
        matches = glob.glob(path)
        return (f"{path!r} is a glob ({len(matches)} file(s) match it), not a shard: "
                f"{example(os.path.dirname(path), matches)}")
    if Path(path).is_dir():
        tars = glob.glob(os.path.join(glob.escape(path), "*.tar"))
        return f"{path!r} is a folder (with {len(tars)} .tar file(s)), not a shard: {example(path, tars)}"
    named = f"{path!r} (from {given!r})" if path != given else repr(path)
    return f"{len(missing)} of {total} shard(s) not found, e.g. {named}"


def brace_pattern(paths: list[str]) -> str:
    """A brace pattern that expands to exactly `paths`: their common start and end around the part
    that differs, as ranges where that part is numbers of one width ('train-{000000..000003}.tar',
    'train-{{000000..000003},000005}.tar'), else as a list ('{a,b}.tar')."""
    paths = sorted(paths)
    if len(paths) == 1:
        return paths[0]
    start = os.path.commonprefix(paths).rstrip("0123456789")  # a number's digits stay together
    end = os.path.commonprefix([p[len(start):][::-1] for p in paths])[::-1].lstrip("0123456789")
    parts = [p[len(start):len(p) - len(end)] for p in paths]
    if all(x.isdigit() and len(x) == len(parts[0]) for x in parts):
        runs = [[parts[0]]]
        for prev, x in zip(parts, parts[1:]):
            if int(x) == int(prev) + 1:
                runs[-1].append(x)
            else:
                runs.append([x])
        parts = [f"{{{r[0]}..{r[-1]}}}" if len(r) > 1 else r[0] for r in runs]
        if len(parts) == 1:
            return f"{start}{parts[0]}{end}"
    return f"{start}{{{','.join(parts)}}}{end}"


@dataclass
class Source:
    """A resolved training source: its name in metrics, its weight in the mix, its shard URLs, and
    the keys of the samples it keeps (None: all)."""

    name: str
    weight: float
    urls: list[str]
    keep: frozenset[str] | None = None


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
    if p == "demo-noisy":  # the demo's train concepts with planted faults, for curation; the demo's eval
        from mmpretrain.data.demo_noisy import demo_noisy_corpus

        return demo_noisy_corpus(data.demo.cache_dir, data.demo.variants_per_concept, data.demo.seed)[split]
    return p


def train_sources(data: DataConfig) -> list[Source]:
    """`data.sources` resolved: one `Source` per entry (weight 0 entries left out)."""
    from mmpretrain.data.curate.core import read_uids

    def keep(s, i: int) -> frozenset[str] | None:
        if not s.keep:
            return None
        try:
            return frozenset(read_uids(s.keep))
        except ConfigError as e:
            raise ConfigError(f"data.sources[{i}].keep: {e}") from None

    return [Source(s.label, s.weight, expand([_pattern(data, s.pattern, "train")], f"data.sources[{i}]"), keep(s, i))
            for i, s in enumerate(data.sources) if s.weight > 0]


def resolve_sources(data: DataConfig, split: str) -> list[str]:
    """Shard URLs for `split` ("train": every training source's, or "eval"): expands braces,
    resolves "demo"."""
    if split == "train":
        return [u for source in train_sources(data) for u in source.urls]
    return eval_urls(data, data.eval_sources)


def eval_urls(data: DataConfig, patterns: list[str], what: str = "data.eval_sources") -> list[str]:
    """Eval shard patterns (a demo corpus' name: its eval split) -> URLs."""
    return expand([_pattern(data, p, "eval") for p in patterns], what)


def zero_shot(patterns: list[str]) -> bool:
    """Whether retrieval on these eval patterns is zero-shot: all of them built-in corpora whose
    eval split is (the title says "held-out zero-shot" then, else "held-out")."""
    return bool(patterns) and all(p in ZERO_SHOT_CORPORA for p in patterns)


def demo_classification_sets(data: DataConfig, modalities: list[str]) -> dict[str, Path]:
    """The zero-shot classification sets of `modalities` that the demo corpora among data.eval_sources
    write beside their shards (classify/<modality>-<attribute>/, CLIP_benchmark's layout): name -> folder."""
    folders = [Path(_pattern(data, p, "eval")).parent / "classify"
               for p in data.eval_sources if p in DEMO_CORPORA]
    return {d.name: d for folder in folders if folder.is_dir() for d in sorted(folder.iterdir())
            if d.name.partition("-")[0] in modalities}


TAR_ADVICE = ("`python -m mmpretrain.data.inspect` shows what a shard holds, "
              "`python -m mmpretrain.data.make_shards` writes WebDataset shards")


class _Unreadable(Exception):
    """Why a shard gave no complete sample (the rest of a sentence that starts with its name), and
    what to do."""

    def __init__(self, why: str, advice: str = TAR_ADVICE):
        super().__init__(why)
        self.advice = advice


def check_data(cfg: Config, sources: list[Source], eval_urls: list[str], ranks: int = 1,
               announce: bool = True) -> None:
    """Before a model is built: every training source and the eval shards open and hold a complete
    sample and media the model reads (`check_media`), and the training data hold one global batch
    (train.batch_size x `ranks` data-parallel ranks). Local shards are read in order, headers
    only, until that many samples are found, so a large corpus costs its first shard; a URL or
    `pipe:` source is opened once, within seconds, and read to its first sample (counting it
    would download it). Samples that are all interleaved documents need the next-token objective.
    `announce`: say, in one log line, that own training data are evaluated on the demo corpus."""
    need, found, counted, only_documents = cfg.train.batch_size * ranks, 0, True, True
    for source in sources:
        n, documents = _samples(source.urls, "data.sources", max(1, need - found))
        only_documents = only_documents and documents == n
        if not all(map(is_local, source.urls)):  # its first sample only: not a count
            n = None
        elif source.keep is not None:  # a uid list: at most its samples
            n = min(n, len(source.keep))
        counted, found = counted and n is not None, found + (n or 0)
    _samples(eval_urls, "data.eval_sources", 1)
    check_media(cfg, [s.urls for s in sources], "data.sources")
    check_media(cfg, [eval_urls], "data.eval_sources")
    if only_documents and not cfg.objectives.next_token_weight:
        raise ConfigError(f"objectives.next_token_weight: 0, and data.sources hold interleaved documents only "
                          f"(samples with a {DOC_KEY}), which only the next-token objective trains: nothing would "
                          f"train; set objectives.next_token_weight above 0 or add media-caption data")
    # resampled streams repeat shards to fill a batch; token-budget batches may hold fewer samples
    if counted and found < need and not cfg.data.resampled and not cfg.data.max_tokens:
        shards = sum(len(s.urls) for s in sources)
        ranks_note = f" x {ranks} data-parallel ranks = {need}" if ranks > 1 else ""
        raise ConfigError(f"data.sources: {found} sample(s) in {shards} shard(s), fewer than one global "
                          f"batch (train.batch_size={cfg.train.batch_size}{ranks_note}); lower "
                          f"train.batch_size or add data")
    own = any(s.pattern not in DEMO_CORPORA for s in cfg.data.sources if s.weight > 0)
    if announce and own and any(p in DEMO_CORPORA for p in cfg.data.eval_sources):
        log.warning("data.eval_sources is the built-in demo corpus: retrieval is measured on it, not on your "
                    "data (set data.eval_sources to held-out shards of your own)")


def check_media(cfg: Config, url_lists: list[list[str]], what: str) -> None:
    """Some sample of the shards (each list: one source's) holds media of the model's modalities, or
    one error says what the data holds instead, not every sample skipped as `no_media`. Member
    names only, of each source's first local samples until one has such media (at most
    MEDIA_SCAN); sources of documents alone, or not local, are not judged."""
    from mmpretrain.encoders import MODALITIES

    kinds = {ext: m for m, spec in MODALITIES.items() for ext in spec.extensions}
    captions = {k.partition(":")[0] for k in cfg.data.caption_keys}
    found, n = set(), 0
    for urls in url_lists:
        local = [u for u in urls if is_local(u)]
        if not local:
            return
        for members in itertools.islice(_sample_members(local), MEDIA_SCAN):
            media = {kinds[e] for e in members if e in kinds}
            # a modality's `extras` may derive another's media from its members (a video's audio track)
            if media & set(cfg.model.modalities) or any(MODALITIES[m].extras for m in media):
                return
            n += DOC_KEY not in members
            found |= media | ({"text"} if members & captions else set())
    if n:
        media = [m for m in MODALITIES if m in found]
        holds = ", ".join(media + ["text"] * ("text" in found)) or "no media, no captions"
        hint = f" (model.modalities=[{','.join(media)}])" if media else ""
        wanted = " or ".join(cfg.model.modalities)
        raise ConfigError(f"{what}: the data has no {wanted} (found: {holds} in its first {n} sample(s)); "
                          f"set model.modalities to what it holds{hint}, or give shards with {wanted}")


def _sample_members(urls: list[str]):
    """Each sample's member extensions, in order over local shards (headers only; a shard that
    cannot be read is passed over: `_samples` reports those)."""
    for url in urls:
        try:
            with tarfile.open(url) as tar:
                key, members = None, set()
                for member in tar:
                    k, ext = base_plus_ext(member.name) if member.isreg() else (None, None)
                    if k is None:
                        continue
                    if k != key and key is not None:
                        yield members
                        members = set()
                    key = k
                    members.add(ext)
                if key is not None:
                    yield members
        except (tarfile.TarError, OSError):
            continue


def _samples(urls: list[str], what: str, want: int) -> tuple[int, int]:
    """(complete samples, interleaved documents among them) in the first shards of `urls`, read
    in order until `want` are found (a bad shard among good ones is skipped, as training skips
    it); of a URL or pipe: source only the first shard is read, to its first sample. None found:
    a ConfigError naming the first shard and why."""
    local = all(map(is_local, urls))
    found, documents, failures = 0, 0, []
    for url in urls if local else urls[:1]:
        try:
            n, docs = _shard_samples(url, want - found if local else 1)
            found, documents = found + n, documents + docs
        except _Unreadable as e:
            failures.append((url, e))
        if found >= want:
            break
    if not found:
        (url, e), more = failures[0], len(failures) - 1
        also = f" (and {more} more shard(s) with no complete sample)" if more else ""
        raise ConfigError(f"{what}: {url!r} {e}{also}; {e.advice}")
    return found, documents


def _shard_samples(url: str, limit: int) -> tuple[int, int]:
    """Complete samples at the start of one shard, counted up to `limit`, and the interleaved
    documents among them."""
    with contextlib.ExitStack() as stack:
        if is_local(url):
            if os.path.getsize(url) == 0:
                raise _Unreadable("is empty (0 bytes)")
            where = {"name": url}  # seekable: member data is passed over, not read
        else:
            where = {"fileobj": stack.enter_context(_remote(url)), "mode": "r|*"}
        try:
            tar = stack.enter_context(tarfile.open(**where))
        except tarfile.ReadError:
            raise _Unreadable("is not a tar file") from None
        return _count(tar, limit)


def _count(tar: tarfile.TarFile, limit: int) -> tuple[int, int]:
    """Samples in `tar`, grouped as webdataset groups them (consecutive members sharing the name
    before the extension), up to `limit`, and the interleaved documents (a doc.json member) among
    them; a sample counts once the next begins or the archive ends, so one that a read error cuts
    short does not."""
    n, documents, key, members = 0, 0, None, 0
    document = False  # the sample being read is one
    try:
        for member in tar:
            members += 1
            k, ext = base_plus_ext(member.name) if member.isreg() else (None, None)
            if k is None or k == key:
                document = document or ext == DOC_KEY
                continue
            n, documents, key, document = n + (key is not None), documents + document, k, ext == DOC_KEY
            if n >= limit:
                return n, documents
    except (tarfile.TarError, OSError) as e:
        if n:
            return n, documents
        where = "inside the first" if key else "before one"
        raise _Unreadable(f"holds no complete sample: it breaks off {where} ({e})") from None
    n, documents = n + (key is not None), documents + document
    if not n:
        raise _Unreadable("is an empty tar" if not members else
                          f"holds no sample: none of its {members} member(s) is named <key>.<extension>")
    return n, documents


@contextlib.contextmanager
def _remote(url: str):
    """A URL's or a pipe: command's byte stream; one that cannot be opened is _Unreadable at once
    (webdataset's own opener retries a URL for minutes)."""
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE)
        try:
            yield proc.stdout
        except _Unreadable:
            with contextlib.suppress(subprocess.TimeoutExpired):
                if proc.wait(timeout=URL_TIMEOUT):  # it printed nothing of use: did it fail?
                    raise _Unreadable(f"failed: the command ended with exit status {proc.returncode}",
                                      "it runs in the shell and must write a tar to its stdout") from None
            raise
        finally:
            proc.kill()  # read far enough
            proc.wait()
            proc.stdout.close()
        return
    try:  # http(s) with a timeout; webdataset's other schemes (file:, gs:, ...) as it opens them
        stream = (urllib.request.urlopen(url, timeout=URL_TIMEOUT) if url.startswith(("http://", "https://"))
                  else wds.gopen(url))
    except urllib.error.HTTPError as e:
        raise _Unreadable(f"cannot be opened: HTTP {e.code} {e.reason}", "check the address") from None
    except (OSError, ValueError) as e:  # URLError is an OSError; ValueError: a scheme nobody knows
        raise _Unreadable(f"cannot be opened: {getattr(e, 'reason', e)}",
                          "check the address, and that this machine reaches it") from None
    try:
        yield stream
    finally:
        with contextlib.suppress(OSError):
            stream.close()
