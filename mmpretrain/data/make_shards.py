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

Every sample needs a caption: a media file without one, an empty input, or a
manifest row that cannot be read is an error naming the file or the line. Each
shard is written as `<name>.partial` and renamed when complete, so an error
leaves the shards before it, complete, and no partial one.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import time
from pathlib import Path

CAPTION_EXTS = ("txt", "caption", "json")
PARTIAL = ".partial"  # a shard being written


def _media_exts() -> dict[str, str]:
    from mmpretrain.encoders import MODALITIES

    return {ext: m for m, spec in MODALITIES.items() for ext in spec.extensions}


def _key(text: str) -> str:
    """A webdataset key: no dots (they separate the extension) and no path separators."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "sample"


def _require_caption(sample: dict, media_file: Path) -> None:
    """A sample training would skip as missing_text / empty_text is refused here, not written."""
    from mmpretrain.config import DataConfig
    from mmpretrain.data.samples import BadSample, find_captions

    try:
        find_captions(sample, DataConfig().caption_keys)
    except BadSample as e:
        raise ValueError(f"{media_file}: no usable caption ({e.reason}); expected {media_file.stem}.txt or "
                         f".caption (one caption per line) or a .json with a 'caption' or 'text' field"
                         ) from e


def samples_from_folder(folder: Path):
    """Files grouped by their path without extension -> samples {"__key__", ext: bytes}."""
    media, groups = _media_exts(), {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        ext = path.suffix.lower().lstrip(".")
        if ext in media or ext in CAPTION_EXTS:
            groups.setdefault(path.with_suffix(""), {})[ext] = path
    found = 0
    for stem, files in groups.items():
        if media_files := [path for ext, path in files.items() if ext in media]:
            sample = {"__key__": _key(str(stem.relative_to(folder))),
                      **{ext: path.read_bytes() for ext, path in files.items()}}
            _require_caption(sample, media_files[0])
            found += 1
            yield sample
    if not found:
        raise ValueError(f"{folder}: no media files ({', '.join(sorted(media))}) found")


def _rows(manifest: Path):
    """-> (line number, row) of a .jsonl or .csv manifest (a CSV row's last line)."""
    if manifest.suffix.lower() == ".jsonl":
        with open(manifest, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError as e:
                        raise ValueError(f"{manifest}, line {n}: not a JSON object ({e})") from e
                    yield n, row if isinstance(row, dict) else {}
    else:
        with open(manifest, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for row in reader:
                yield reader.line_num, row


def _captions(value) -> list[str]:
    """A manifest's caption: a string, or (JSONL) a list of strings; [] when empty."""
    values = value if isinstance(value, list) else [value]
    captions = [c.replace("\n", " ").strip() for c in values if isinstance(c, str)]
    return captions if captions and all(captions) else []


def samples_from_manifest(manifest: Path):
    media = _media_exts()
    n = 0
    for n, (line, row) in enumerate(_rows(manifest), 1):
        where = f"{manifest}, line {line}"
        if "path" not in row or "caption" not in row:
            raise ValueError(f"{where}: lacks 'path' or 'caption' (has {sorted(map(str, row))})")
        if not (captions := _captions(row["caption"])):
            raise ValueError(f"{where}: empty caption")
        sample = {"__key__": f"{n - 1:09d}", "txt": "\n".join(captions).encode()}
        paths = [row["path"]] + [row[m] for m in sorted(set(media.values())) if row.get(m)]
        for p in paths:
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"{where}: empty 'path'")
            path = Path(p) if Path(p).is_absolute() else manifest.parent / p
            ext = path.suffix.lower().lstrip(".")
            if ext not in media:
                raise ValueError(f"{where}: {p} is not a known media type ({sorted(media)})")
            try:
                sample[ext] = path.read_bytes()
            except OSError as e:
                raise ValueError(f"{where}: cannot read {p}: {e.strerror}") from e
        yield sample
    if not n:
        raise ValueError(f"{manifest}: no rows")


def write_shards(samples, pattern: str, max_count: int, max_size_mb: float, progress: bool = True) -> list[str]:
    """-> the shards written. Each is written as `<name>.partial` and renamed when complete; on an
    error the open one is removed, so no partial shard is left."""
    import webdataset as wds
    from tqdm.auto import tqdm

    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    written = []

    def commit(partial: str) -> None:
        written.append(partial.removesuffix(PARTIAL))
        os.replace(partial, written[-1])

    # whole-second member times: webdataset's default, a float time.time(), puts a pax header
    # before every member, which doubles the cost of reading the shards back
    sink = wds.ShardWriter(pattern + PARTIAL, maxcount=max_count, maxsize=int(max_size_mb * 1e6), verbose=0,
                           post=commit, mtime=int(time.time()))
    try:
        for sample in tqdm(samples, desc="samples", unit="sample", disable=not progress):
            sink.write(sample)
    except BaseException:
        sink.post = None  # the open shard is incomplete: closed and removed, never renamed
        sink.close()
        Path(sink.fname).unlink(missing_ok=True)
        raise
    sink.close()
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
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    field = re.search(r"%0?(\d*)d", args.out)
    width = int(field.group(1) or 1)
    braces = f"{{{0:0{width}d}..{len(written) - 1:0{width}d}}}"
    print(f"wrote {len(written)} shard(s): {args.out[:field.start()]}{braces}{args.out[field.end():]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
