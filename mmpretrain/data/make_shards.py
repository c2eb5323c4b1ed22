"""Write WebDataset shards from a folder of media or from a manifest.

    python -m mmpretrain.data.make_shards photos/ --out 'shards/train-%06d.tar'
    python -m mmpretrain.data.make_shards clips.jsonl --out 'shards/train-%06d.tar' --max-count 5000
    python -m mmpretrain.data.make_shards photos/ --out 'shards/train-%06d.tar' --skip-bad --eval-fraction 0.05
    python -m mmpretrain.data.make_shards pets/ --classes --out sets/pets --eval-fraction 0.2

A folder: files sharing a stem are one sample (`dog.jpg` + `dog.txt`, `rain.flac`
+ `rain.json`); media by extension (the modalities' own), captions from `.txt` /
`.caption` sidecars or a `.json` sidecar (kept as it is: `data.caption_keys`
reads its "caption"/"text"). A manifest (`.csv` or `.jsonl`): one row per sample
with `path` (a media file), `caption`, and optionally a column per modality
(`image`, `audio`) naming more media of the same sample; relative paths are
relative to the manifest. Shards close at `--max-count` samples or `--max-size`
megabytes (webdataset's ShardWriter), members keep their bytes (nothing is
re-encoded), and a progress bar shows the samples written.

Every sample is read as training reads it before it is written (its captions as
data.caption_keys finds them; each media file through its modality's decoder, in evaluation mode
with the default sizes), so a file training would skip (no caption, an empty one, a corrupt or
truncated image, audio or video; a manifest's media file that cannot be read) is found now: an
error naming the file, or with --skip-bad left out and counted by reason (missing_text,
bad_image, missing_file, ...). An empty input and a manifest line that cannot be read are errors
naming the file or the line. Each shard is written as `<name>.partial`
and renamed when complete, so an error leaves the shards before it, complete, and no partial one.

--eval-fraction F holds out about F of the samples, chosen by a hash of each sample's key (the
same ones on every run, whatever the order), in shards of their own: --eval-out, by default the
--out pattern with "train" in its file name replaced by "eval" (or "eval-" put before the name).
The last lines give the samples written and the patterns for data.sources / data.eval_sources.

--classes reads the folder as an ImageFolder tree (<class>/<file>, any modality's media) and
writes a classification set in CLIP_benchmark's layout into the --out folder, for
`mmpretrain.eval.classify`, `linear_probe` and `eval.sets`: the class names are the folder names
in ImageFolder's order (sorted; "_" read as a space), the prompts --template (default: one per
modality, e.g. "a photo of a {c}."), the samples the split --split (default test), or with
--eval-fraction F a train/ split and F of them in test/.
"""

from __future__ import annotations

import argparse
import collections
import csv
import functools
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

from mmpretrain.batch import BadSample

CAPTION_EXTS = ("txt", "caption", "json")
PARTIAL = ".partial"  # a shard being written
TEMPLATES = {"image": ["a photo of a {c}."], "audio": ["the sound of a {c}."], "video": ["a video of a {c}."]}


def _media_exts() -> dict[str, str]:
    from mmpretrain.encoders import MODALITIES

    return {ext: m for m, spec in MODALITIES.items() for ext in spec.extensions}


def _key(text: str) -> str:
    """A webdataset key: no dots (they separate the extension) and no path separators."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "sample"


# ---------------------------------------------------------------------------- sources: (where, sample)


def samples_from_folder(folder: Path):
    """Files grouped by their path without extension -> (the media file, sample {"__key__", ext: bytes})."""
    media, groups = _media_exts(), {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        ext = path.suffix.lower().lstrip(".")
        if ext in media or ext in CAPTION_EXTS:
            groups.setdefault(path.with_suffix(""), {})[ext] = path
    found = 0
    for stem, files in groups.items():
        if media_files := [path for ext, path in files.items() if ext in media]:
            found += 1
            yield media_files[0], {"__key__": _key(str(stem.relative_to(folder))),
                                   **{ext: path.read_bytes() for ext, path in files.items()}}
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
    """-> ("<manifest>, line <n>", sample, or a BadSample for an empty caption or a media file
    that cannot be read); a line that cannot be read at all raises ValueError."""
    media = _media_exts()
    n = 0
    for n, (line, row) in enumerate(_rows(manifest), 1):
        where = f"{manifest}, line {line}"
        if "path" not in row or "caption" not in row:
            raise ValueError(f"{where}: lacks 'path' or 'caption' (has {sorted(map(str, row))})")
        if not (captions := _captions(row["caption"])):
            yield where, BadSample("empty_text", "empty caption")
            continue
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
                sample = BadSample("missing_file", f"cannot read {p}: {e.strerror}")
                break
        yield where, sample
    if not n:
        raise ValueError(f"{manifest}: no rows")


# ---------------------------------------------------------------------------- the check and the split


@functools.cache
def _decoders() -> dict:
    """media extension -> (its modality's spec, that modality's default config section)."""
    from mmpretrain.config import ModelConfig
    from mmpretrain.encoders import MODALITIES

    model = ModelConfig()
    return {ext: (spec, spec.section(model)) for spec in MODALITIES.values() for ext in spec.extensions}


def problem(sample: dict, captions: bool = True) -> BadSample | None:
    """Why training would skip this sample (its captions, when `captions`, then each media member
    decoded as in evaluation), or None."""
    from mmpretrain.config import DataConfig
    from mmpretrain.data.samples import find_captions

    try:
        if captions:
            find_captions(sample, DataConfig().caption_keys)
        for ext, data in sample.items():
            if ext in _decoders():
                spec, section = _decoders()[ext]
                spec.decode(data, section, None)
    except BadSample as e:
        return e
    return None


def checked(items, skip_bad: bool, skipped: collections.Counter, captions: bool = True):
    """The samples of (where, sample or BadSample) items training would read; the others raise
    ValueError naming `where`, or with skip_bad are counted in `skipped` by reason and left out."""
    for where, sample in items:
        bad = sample if isinstance(sample, BadSample) else problem(sample, captions)
        if bad is None:
            yield sample
        elif skip_bad:
            skipped[bad.reason] += 1
        elif bad.reason == "missing_text" and isinstance(where, Path):  # a folder's file: name its sidecars
            raise ValueError(f"{where}: no usable caption ({bad.reason}); expected {where.stem}.txt or .caption "
                             f"(one caption per line) or a .json with a 'caption' or 'text' field")
        else:
            raise ValueError(f"{where}: {bad.reason} ({bad.detail or 'training would skip it'}); "
                             f"--skip-bad leaves such files out")


def held_out(key: str, fraction: float) -> bool:
    """Whether a sample is in the held-out split: a hash of its key, so the same samples on every
    run and in any order."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") < fraction * 2**64


# ---------------------------------------------------------------------------- writing


class ShardSet:
    """The shards of one pattern (webdataset's ShardWriter, opened at the first sample or by
    open()), each written as `<name>.partial` and renamed into `written` when complete."""

    def __init__(self, pattern: str, max_count: int, max_size_mb: float):
        self.pattern, self.max_count, self.max_size = pattern, max_count, int(max_size_mb * 1e6)
        self.sink, self.written, self.count = None, [], 0

    def open(self) -> None:
        import webdataset as wds

        Path(self.pattern).parent.mkdir(parents=True, exist_ok=True)
        # whole-second member times: webdataset's default, a float time.time(), puts a pax header
        # before every member, which doubles the cost of reading the shards back
        self.sink = wds.ShardWriter(self.pattern + PARTIAL, maxcount=self.max_count, maxsize=self.max_size,
                                    verbose=0, post=self._commit, mtime=int(time.time()))

    def _commit(self, partial: str) -> None:
        self.written.append(partial.removesuffix(PARTIAL))
        os.replace(partial, self.written[-1])

    def write(self, sample: dict) -> None:
        if self.sink is None:
            self.open()
        self.sink.write(sample)
        self.count += 1

    def close(self, complete: bool = True) -> None:
        """complete=False (an error): the open shard is incomplete, so it is removed, never renamed."""
        if self.sink is None:
            return
        if not complete:
            self.sink.post = None
        self.sink.close()
        if not complete:
            Path(self.sink.fname).unlink(missing_ok=True)

    def braces(self) -> str:
        """The pattern with its %d field as the brace range of the shards written."""
        field = re.search(r"%0?(\d*)d", self.pattern)
        width = int(field.group(1) or 1)
        last = max(len(self.written) - 1, 0)
        return f"{self.pattern[:field.start()]}{{{0:0{width}d}..{last:0{width}d}}}{self.pattern[field.end():]}"


def write_split(samples, sets: dict[str, ShardSet], route, progress: bool = True) -> None:
    """Each sample into sets[route(sample)]; on an error every open shard is removed."""
    from tqdm.auto import tqdm

    try:
        for sample in tqdm(samples, desc="samples", unit="sample", disable=not progress):
            sets[route(sample)].write(sample)
    except BaseException:
        for s in sets.values():
            s.close(complete=False)
        raise
    for s in sets.values():
        s.close()


def write_shards(samples, pattern: str, max_count: int, max_size_mb: float, progress: bool = True) -> list[str]:
    """-> the shards written (one, empty, for no samples). Each is written as `<name>.partial` and
    renamed when complete; on an error the open one is removed, so no partial shard is left."""
    shards = ShardSet(pattern, max_count, max_size_mb)
    shards.open()
    write_split(samples, {"": shards}, lambda _: "", progress)
    return shards.written


def _eval_pattern(out: str) -> str:
    folder, name = os.path.split(out)
    return os.path.join(folder, name.replace("train", "eval") if "train" in name else "eval-" + name)


def _skipped_line(skipped: collections.Counter) -> str:
    return (f"skipped {sum(skipped.values())} sample(s) (--skip-bad): "
            + ", ".join(f"{reason} {n}" for reason, n in skipped.most_common()))


def shards_main(a: argparse.Namespace, source: Path) -> int:
    if "%" not in a.out:
        raise ValueError("--out needs a %d field for the shard number, e.g. shards/train-%06d.tar")
    eval_out = a.eval_out or _eval_pattern(a.out)
    if a.eval_fraction and eval_out == a.out:
        raise ValueError(f"--eval-out {eval_out}: the same pattern as --out")
    if source.is_dir():
        items = samples_from_folder(source)
    elif source.is_file() and source.suffix.lower() in (".csv", ".jsonl"):
        items = samples_from_manifest(source)
    else:
        raise ValueError(f"{source} is neither a folder nor a .csv / .jsonl manifest")
    skipped = collections.Counter()
    sets = {"train": ShardSet(a.out, a.max_count, a.max_size), "eval": ShardSet(eval_out, a.max_count, a.max_size)}
    write_split(checked(items, a.skip_bad, skipped), sets,
                lambda s: "eval" if held_out(s["__key__"], a.eval_fraction) else "train", sys.stderr.isatty())
    train, held = sets["train"], sets["eval"]
    if skipped:
        print(_skipped_line(skipped))
    if not train.count:
        raise ValueError(f"no sample left to write in {a.out}" + (f" ({held.count} held out)" if held.count else ""))
    if a.eval_fraction and not held.count:
        raise ValueError(f"none of the {train.count} sample(s) fell in the held-out split (--eval-fraction "
                         f"{a.eval_fraction} chooses by a hash of each key): give a larger fraction")
    if held.count:
        print(f"held out {held.count} sample(s) in {len(held.written)} shard(s): {held.braces()}")
    print(f"wrote {train.count} sample(s) in {len(train.written)} shard(s): {train.braces()}")
    return 0


# ---------------------------------------------------------------------------- a classification set


def classes_main(a: argparse.Namespace, tree: Path) -> int:
    """An ImageFolder tree -> CLIP_benchmark's layout in a.out (eval.classify.write_dataset)."""
    from mmpretrain.eval.classify import CLASSNAMES, read_classnames, write_dataset

    if not tree.is_dir():
        raise ValueError(f"{tree}: not a folder (--classes reads an ImageFolder tree: <class>/<file>)")
    folders = sorted(d.name for d in tree.iterdir() if d.is_dir())  # torchvision's ImageFolder order
    if not folders:
        raise ValueError(f"{tree}: no class folders (--classes reads an ImageFolder tree: <class>/<file>)")
    media = _media_exts()
    items = [(path, {"__key__": str(path.relative_to(tree)), "label": label, ext: path.read_bytes()})
             for label, name in enumerate(folders) for path in sorted((tree / name).rglob("*"))
             if path.is_file() and (ext := path.suffix.lower().lstrip(".")) in media]
    skipped = collections.Counter()
    rows = [(next(e for e in s if e in media), s) for s in checked(items, a.skip_bad, skipped, captions=False)]
    if skipped:
        print(_skipped_line(skipped))
    if not rows:
        raise ValueError(f"{tree}: no media files ({', '.join(sorted(media))}) in its class folders")
    if len(modalities := sorted({media[ext] for ext, _ in rows})) > 1:
        raise ValueError(f"{tree}: files of {' and '.join(modalities)}: a classification set is of one modality")
    classnames = [name.replace("_", " ") for name in folders]
    if (Path(a.out) / CLASSNAMES).is_file() and read_classnames(Path(a.out)) != classnames:  # a split written before
        raise ValueError(f"{a.out}: holds other classes than {tree}'s folders (another set: choose another --out)")
    splits = collections.defaultdict(list)
    for ext, s in rows:
        split = ("test" if held_out(s["__key__"], a.eval_fraction) else "train") if a.eval_fraction else a.split
        splits[split].append((ext, s[ext], s["label"]))
    if a.eval_fraction and len(splits) < 2:
        raise ValueError(f"--eval-fraction {a.eval_fraction} put all {len(rows)} sample(s) in {next(iter(splits))}/ "
                         f"(it chooses by a hash of each file's path): give another fraction")
    write_dataset(Path(a.out), classnames, a.template or TEMPLATES[modalities[0]], dict(splits))
    counts = ", ".join(f"{split} {len(v)}" for split, v in sorted(splits.items()))
    print(f"wrote {len(rows)} sample(s) of {len(classnames)} classes ({counts}): {a.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmpretrain.data.make_shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a folder of media with sidecar captions, or a .csv / .jsonl manifest "
                                  "(--classes: an ImageFolder tree)")
    p.add_argument("--out", required=True, help="shard name pattern with a %%d field, e.g. shards/train-%%06d.tar "
                                                "(--classes: the set's folder)")
    p.add_argument("--max-count", type=int, default=10_000, help="samples per shard (default 10000)")
    p.add_argument("--max-size", type=float, default=1000.0, help="megabytes per shard (default 1000)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out files training would skip (no caption, undecodable), counted by reason")
    p.add_argument("--eval-fraction", type=float, default=0.0, metavar="F",
                   help="hold out about F of the samples (by a hash of each key) in shards of their own")
    p.add_argument("--eval-out", default=None, help="the held-out shards' pattern (default: --out with 'eval' "
                                                    "for 'train' in its file name)")
    p.add_argument("--classes", action="store_true",
                   help="write a classification set in CLIP_benchmark's layout from an ImageFolder tree")
    p.add_argument("--split", default="test", help="--classes: the split written (default test)")
    p.add_argument("--template", action="append", default=None, metavar="TEXT",
                   help="--classes: a prompt template with {c} for the class name (repeat for more)")
    a = p.parse_args(argv)
    try:
        if not 0 <= a.eval_fraction < 1:
            raise ValueError(f"--eval-fraction {a.eval_fraction}: expected a fraction, at least 0 and below 1")
        if a.template and (bad := [t for t in a.template if "{c}" not in t]):
            raise ValueError(f"--template {bad[0]!r}: no {{c}} for the class name")
        return classes_main(a, Path(a.source)) if a.classes else shards_main(a, Path(a.source))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
