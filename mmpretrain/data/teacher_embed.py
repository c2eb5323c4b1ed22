"""Offline distillation: a teacher's embeddings stored with the data (MobileCLIP's reinforced
datasets), so that training reads them instead of running the teacher.

    python -m mmpretrain.data.teacher_embed 'shards/train-{000000..000009}.tar' \
        --teacher runs/big/export --out 'shards_teacher/train-%06d.tar'

Writes new shards holding every member of every sample, as it was, plus `teacher.npz`: the
teacher's embedding of each caption of the sample (`text`, one row per caption, in the caption
member's order), of each of its media the teacher reads (`image`, `audio`, ...; zeros and
`has_<modality>` 0 where the sample lacks one) and the teacher's learned logit scales
(`logit_scale.<pair>`). The teacher sees every sample as evaluation does (its own preprocessing,
no augmentation: the student trains on random crops of what the teacher embedded once).
Train on the new shards with `objectives.distill.teacher=offline`. Samples the teacher cannot
read (bad media, no caption) and interleaved documents are written unchanged, without
`teacher.npz`; training counts the former under their own skip reason and the rest as
`missing_teacher`.

Beside the old shards instead, when copying the corpus is not wanted:

    python -m mmpretrain.data.teacher_embed 'shards/train-{000000..000009}.tar' \
        --teacher runs/big/export --beside

writes, for each local shard `train-000000.tar`, a sidecar `train-000000.teacher.tar` next to
it holding only `__key__` and `teacher.npz` of its embedded samples, in the shard's order (a few
KiB a sample). Training with `objectives.distill.teacher=offline` on the old shards reads each
shard's sidecar beside it (`with_sidecars`); a sample whose shard has none, or which its
sidecar lacks, is a `missing_teacher` skip.
"""

from __future__ import annotations

import argparse
import io
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

MEMBER = "teacher.npz"
SIDECAR = ".teacher.tar"  # train-000000.tar -> train-000000.teacher.tar


def sidecar_of(url: str) -> str:
    """The sidecar shard beside shard `url` (--beside)."""
    return url.removesuffix(".tar") + SIDECAR


def with_sidecars(handler):
    """A webdataset stage, {"url"} -> raw samples like `tarfile_to_samples(handler)`, each with
    the `teacher.npz` of its shard's sidecar where the sidecar holds its key. A sidecar's keys
    are its shard's embedded keys in the shard's order, so both are read once, side by side."""
    import webdataset as wds

    def stage(urls):
        for entry in urls:
            shard = wds.tarfile_to_samples(handler=handler)(iter([entry]))
            beside = sidecar_of(entry["url"])
            side = wds.tarfile_to_samples(handler=handler)(iter([{"url": beside}])) if is_local_file(beside) \
                else iter(())
            head = next(side, None)
            for raw in shard:
                if head is not None and head["__key__"] == raw["__key__"]:
                    raw = {**raw, MEMBER: head[MEMBER]}
                    head = next(side, None)
                yield raw

    return stage


def is_local_file(url: str) -> bool:
    from mmpretrain.data.sources import is_local

    return is_local(url) and Path(url.removeprefix("file:")).is_file()


def teacher_members(parsed: list[dict], pretrained, batch_size: int) -> list[bytes]:
    """Parsed samples (SampleParser, eval mode) -> one `teacher.npz` each."""
    model, modalities = pretrained.model, pretrained.cfg.modalities
    out = []
    for start in range(0, len(parsed), batch_size):
        chunk = parsed[start : start + batch_size]
        captions = [c for s in chunk for c in s["captions"]]
        text = [pretrained.encode_text(captions[i : i + batch_size]).float().cpu()
                for i in range(0, len(captions), batch_size)]
        text = torch.cat(text).numpy()
        media = {}
        for m in modalities:
            have = [s[m] for s in chunk if m in s]
            with torch.no_grad():
                media[m] = iter(model.encode_media(m, torch.stack(have).to(pretrained.device))[1].float().cpu().numpy()
                                if have else [])
        row = 0
        for s in chunk:
            arrays = {"text": text[row : row + len(s["captions"])]}
            row += len(s["captions"])
            for m in modalities:
                arrays[m] = next(media[m]) if m in s else np.zeros(model.embed_dim, np.float32)
                arrays[f"has_{m}"] = np.array(m in s)
            arrays.update({f"logit_scale.{pair}": np.array(v, np.float32) for pair, v in pretrained.logit_scale.items()})
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            out.append(buf.getvalue())
    return out


def samples(urls: list[str], pretrained, batch_size: int, counts: dict, caption_keys: list[str] | None = None):
    """Raw samples of `urls` in order, each with `teacher.npz` where the teacher can read it;
    captions found as `caption_keys` (data.caption_keys) says, as training will find them."""
    import webdataset as wds

    from mmpretrain.config import Config
    from mmpretrain.data.samples import DOC_KEY, BadSample, SampleParser

    cfg = Config()
    cfg.model = pretrained.cfg
    cfg.data.caption_keys = list(caption_keys or cfg.data.caption_keys)
    parser = SampleParser(cfg, False, pretrained.tokenizer)
    pending: list[tuple[dict, dict]] = []

    def flush():
        for (raw, _), member in zip(pending, teacher_members([p for _, p in pending], pretrained, batch_size)):
            yield {**raw, MEMBER: member}
        pending.clear()

    for raw in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
        raw = {k: v for k, v in raw.items() if k == "__key__" or not k.startswith("__")}
        raw.pop(MEMBER, None)  # a sample embedded before: this teacher's embeddings replace those
        if DOC_KEY in raw:
            counts["documents"] += 1
            yield raw
            continue
        try:
            parsed = parser(raw, random.Random(0))
        except BadSample as e:
            counts[e.reason] = counts.get(e.reason, 0) + 1
            yield raw
            continue
        counts["embedded"] += 1
        pending.append((raw, parsed))
        if len(pending) == batch_size:
            yield from flush()
    yield from flush()


def read_member(data: bytes, caption: int, modalities: list[str]) -> tuple[dict, int]:
    """A sample's `teacher.npz` -> ({"text": (E,) the embedding of caption number `caption`,
    <modality>: (E,) for those of `modalities` the teacher reads (zeros where the sample has none),
    "scale": {pair: float}}, the number of captions it embedded)."""
    with np.load(io.BytesIO(data)) as z:
        text = z["text"]
        out = {"text": torch.from_numpy(text[min(caption, len(text) - 1)].copy())}
        out.update({m: torch.from_numpy(z[m].copy()) for m in modalities if m in z.files})
        out["scale"] = {k.removeprefix("logit_scale."): float(z[k]) for k in z.files if k.startswith("logit_scale.")}
    return out, len(text)


def write_sidecar(url: str, raws) -> str:
    """`url`'s sidecar from its samples (those of `samples([url], ...)`), written whole or not at all."""
    import webdataset as wds

    path = Path(sidecar_of(url).removeprefix("file:"))
    partial = path.with_name(path.name + ".partial")
    try:
        with wds.TarWriter(str(partial), mtime=int(time.time())) as sink:  # whole seconds: no pax headers
            for raw in raws:
                if MEMBER in raw:
                    sink.write({"__key__": raw["__key__"], MEMBER: raw[MEMBER]})
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    from mmpretrain.config import ConfigError
    from mmpretrain.data.make_shards import write_shards
    from mmpretrain.data.sources import expand
    from mmpretrain.pretrained import load_pretrained
    from tqdm.auto import tqdm

    p = argparse.ArgumentParser(prog="python -m mmpretrain.data.teacher_embed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", nargs="+", help="shard patterns (brace ranges like train-{000000..000009}.tar)")
    p.add_argument("--teacher", required=True, help="an mmpretrain run, export or checkpoint folder")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="new shard name pattern with a %%d field, e.g. out/train-%%06d.tar")
    where.add_argument("--beside", action="store_true",
                       help="write <shard>.teacher.tar beside each (local) shard instead of new shards")
    p.add_argument("--max-count", type=int, default=10_000, help="samples per new shard (default 10000)")
    p.add_argument("--batch-size", type=int, default=64, help="samples the teacher embeds at once (default 64)")
    p.add_argument("--caption-keys", nargs="+", default=None, metavar="KEY",
                   help="where captions are, as the training run's data.caption_keys (default: its default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if a.out and not re.search(r"%0?\d*d", a.out):
        print("error: --out needs a %d field for the shard number, e.g. out/train-%06d.tar", file=sys.stderr)
        return 2
    try:
        urls = expand(a.shards, "shards")
        pretrained = load_pretrained(a.teacher, a.device)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.beside and (remote := [u for u in urls if not is_local_file(u)]):
        print(f"error: --beside writes next to local shards; {remote[0]!r} is not one (use --out)", file=sys.stderr)
        return 2
    counts = {"embedded": 0, "documents": 0}
    if a.beside:
        written = [write_sidecar(url, samples([url], pretrained, a.batch_size, counts, a.caption_keys))
                   for url in tqdm(urls, desc="shards", unit="shard", disable=not sys.stderr.isatty())]
    else:
        written = write_shards(samples(urls, pretrained, a.batch_size, counts, a.caption_keys), a.out, a.max_count,
                               1e6, progress=sys.stderr.isatty())
    skipped = ", ".join(f"{k} {v}" for k, v in counts.items() if k not in ("embedded", "documents"))
    where = "sidecar(s) beside their shards" if a.beside else f"shard(s) to {a.out}"
    print(f"wrote {len(written)} {where}: {counts['embedded']} sample(s) with the teacher's embeddings, "
          f"{counts['documents']} document(s) and {sum(counts.values()) - counts['embedded'] - counts['documents']} "
          f"unreadable sample(s) unchanged{f' ({skipped})' if skipped else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
