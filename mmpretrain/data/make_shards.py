"""Write WebDataset shards from a folder of media or from a manifest.

    python -m mmpretrain.data.make_shards photos/ --out 'shards/train-%06d.tar'
    python -m mmpretrain.data.make_shards clips.jsonl --out 'shards/train-%06d.tar' --max-count 5000

A folder: files sharing a stem are one sample (`dog.jpg` + `dog.txt`, `rain.flac`
+ `rain.json`); media by extension (the modalities' own), captions from `.txt` /
`.caption` sidecars or a `.json` sidecar (kept as it is: `data.caption_keys`
reads its "caption"/"text"). A manifest (`.csv` or `.jsonl`): one row per sample
with `path` (a media file), `caption`, and optionally a column per modality
(`image`, `audio`) naming more media of the same sample; relative paths are
relative to the manifest. Shards close at `--max-count` samples or `--max-size`
megabytes (webdataset's ShardWriter), members keep their bytes (nothing is
re-encoded), and a progress bar shows the samples written.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from pathlib import Path

CAPTION_EXTS = ("txt", "caption", "json")


def _media_exts() -> dict[str, str]:
    from mmpretrain.encoders import MODALITIES

    return {ext: m for m, spec in MODALITIES.items() for ext in spec.extensions}


def _key(text: str) -> str:
    """A webdataset key: no dots (they separate the extension) and no path separators."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "sample"


def samples_from_folder(folder: Path):
    """Files grouped by their path without extension -> samples {"__key__", ext: bytes}."""
    media, groups = _media_exts(), {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        ext = path.suffix.lower().lstrip(".")
        if ext in media or ext in CAPTION_EXTS:
            groups.setdefault(path.with_suffix(""), {})[ext] = path
    for stem, files in groups.items():
        if any(ext in media for ext in files):
            yield {"__key__": _key(str(stem.relative_to(folder))),
                   **{ext: path.read_bytes() for ext, path in files.items()}}


def _rows(manifest: Path):
    if manifest.suffix.lower() == ".jsonl":
        with open(manifest) as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
    else:
        with open(manifest, newline="") as f:
            yield from csv.DictReader(f)


def samples_from_manifest(manifest: Path):
    media = _media_exts()
    for i, row in enumerate(_rows(manifest)):
        if "path" not in row or "caption" not in row:
            raise ValueError(f"{manifest}: row {i + 1} lacks 'path' or 'caption' (has {sorted(row)})")
        sample = {"__key__": f"{i:09d}", "txt": str(row["caption"]).encode()}
        paths = [row["path"]] + [row[m] for m in set(media.values()) if row.get(m)]
        for p in paths:
            path = Path(p) if Path(p).is_absolute() else manifest.parent / p
            ext = path.suffix.lower().lstrip(".")
            if ext not in media:
                raise ValueError(f"{manifest}: row {i + 1}: {p} is not a known media type ({sorted(media)})")
            sample[ext] = path.read_bytes()
        yield sample


def write_shards(samples, pattern: str, max_count: int, max_size_mb: float, progress: bool = True) -> list[str]:
    import webdataset as wds
    from tqdm.auto import tqdm

    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    written = []
    # whole-second member times: webdataset's default, a float time.time(), puts a pax header
    # before every member, which doubles the cost of reading the shards back
    with wds.ShardWriter(pattern, maxcount=max_count, maxsize=int(max_size_mb * 1e6), verbose=0,
                         post=written.append, mtime=int(time.time())) as sink:
        for sample in tqdm(samples, desc="samples", unit="sample", disable=not progress):
            sink.write(sample)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmpretrain.data.make_shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a folder of media with sidecar captions, or a .csv / .jsonl manifest")
    p.add_argument("--out", required=True, help="shard name pattern with a %%d field, e.g. shards/train-%%06d.tar")
    p.add_argument("--max-count", type=int, default=10_000, help="samples per shard (default 10000)")
    p.add_argument("--max-size", type=float, default=1000.0, help="megabytes per shard (default 1000)")
    args = p.parse_args(argv)
    source = Path(args.source)
    if "%" not in args.out:
        print("error: --out needs a %d field for the shard number, e.g. shards/train-%06d.tar", file=sys.stderr)
        return 2
    if source.is_dir():
        samples = samples_from_folder(source)
    elif source.is_file() and source.suffix.lower() in (".csv", ".jsonl"):
        samples = samples_from_manifest(source)
    else:
        print(f"error: {source} is neither a folder nor a .csv / .jsonl manifest", file=sys.stderr)
        return 2
    try:
        written = write_shards(samples, args.out, args.max_count, args.max_size, progress=sys.stderr.isatty())
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not written:
        print(f"error: no samples found in {source}", file=sys.stderr)
        return 2
    field = re.search(r"%0?(\d*)d", args.out)
    width = int(field.group(1) or 1)
    braces = f"{{{0:0{width}d}..{len(written) - 1:0{width}d}}}"
    print(f"wrote {len(written)} shard(s): {args.out[:field.start()]}{braces}{args.out[field.end():]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
