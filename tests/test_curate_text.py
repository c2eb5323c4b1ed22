"""The text curation steps through the real CLI on tiny shards made here: DSIR importance resampling
(and its parity with the data-selection package's own HashedNgramDSIR) and the caption filters."""

import itertools
import json
import random

import numpy as np
import pytest
import webdataset as wds

from mmpretrain.data.curate import main
from mmpretrain.data.demo import COLOURS, PLACES, SHAPES

from conftest import png_bytes, run

PNG = png_bytes()
CONCEPTS = list(itertools.product(COLOURS, SHAPES, PLACES))


def demo_style(i: int) -> str:
    c, s, p = CONCEPTS[i % len(CONCEPTS)]
    return f"a {c} {s} {p}"


def web_style(i: int) -> str:
    c, s, p = CONCEPTS[i % len(CONCEPTS)]
    return f"free stock photo of {c} {s} {p.removeprefix('in the ')} hd wallpaper"


def write_shards(folder, name: str, captions: list, per_shard: int = 1000) -> str:
    """Samples {png, txt} (a None caption: no txt member) -> their shards' brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / f"{name}-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i, caption in enumerate(captions):
            text = {} if caption is None else {"txt": caption}
            sink.write({"__key__": f"{name}{i:04d}", "png": PNG, **text})
    last = (len(captions) - 1) // per_shard
    return str(folder / f"{name}-{{000000..{last:06d}}}.tar")


def curate(*argv) -> tuple[list[str], dict, dict]:
    """Run a step with --workers 1 unless given -> (keep.txt lines, {key: removed line}, report.json)."""
    out = argv[argv.index("--out") + 1]
    assert main([*argv, *(() if "--workers" in argv else ("--workers", "1"))]) == 0
    keep = open(f"{out}/keep.txt").read().split()
    removed = {r["key"]: r for r in map(json.loads, open(f"{out}/removed.jsonl"))}
    return keep, removed, json.load(open(f"{out}/report.json"))


@pytest.fixture
def mixture(tmp_path):
    """100 captions, half demo style (the target's), half web boilerplate, shuffled; 50 target captions."""
    order = list(range(100))
    random.Random(0).shuffle(order)
    captions = [demo_style(i) if i % 2 else web_style(i) for i in order]
    target = [demo_style(3 * i + 1) for i in range(50)]
    return captions, target


def test_dsir_keeps_the_target_style_and_matches_hashed_ngram_dsir(tmp_path, mixture):
    from data_selection import HashedNgramDSIR

    captions, target = mixture
    shards = write_shards(tmp_path / "raw", "raw", captions + [None])  # the last: no caption
    (tmp_path / "target.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in target))
    keep, removed, report = curate("dsir", shards, "--out", str(tmp_path / "out"),
                                   "--target", str(tmp_path / "target.jsonl"), "--fraction", "0.5")
    style = {f"raw{i:04d}": c.startswith("a ") for i, c in enumerate(captions)}
    assert len(keep) == 50 and sum(style[k] for k in keep) / len(keep) >= 0.9
    assert removed["raw0100"]["reason"] == "missing_text"
    assert {r["reason"] for k, r in removed.items() if k != "raw0100"} == {"dsir_not_selected"}
    assert report["stats"]["target_texts"] == 50 and report["stats"]["selected"] == 50
    assert report["stats"]["log_weight_kept"]["median"] > report["stats"]["log_weight_removed"]["median"]

    # the reference on the same text, as jsonl files: its log importance weights, per example in order
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps({"text": c}) + "\n" for c in captions))
    ref = HashedNgramDSIR([str(tmp_path / "raw.jsonl")], [str(tmp_path / "target.jsonl")],
                          str(tmp_path / "cache"), num_proc=1, min_example_length=1, ngrams=2,
                          num_buckets=10000)
    ref.fit_importance_estimator(num_tokens_to_fit="all")
    ref.compute_importance_weights()
    expected = np.load(tmp_path / "cache" / "log_importance_weights" / "0.npy")
    ours = [json.loads(line) for line in open(tmp_path / "out" / "log_weights.jsonl")]
    assert [r["key"] for r in ours] == [f"raw{i:04d}" for i in range(100)]
    np.testing.assert_allclose([r["log_weight"] for r in ours], expected, rtol=0, atol=1e-6)


def test_dsir_is_deterministic_across_reruns_and_workers(tmp_path, mixture):
    captions, target = mixture
    shards = write_shards(tmp_path / "raw", "raw", captions, per_shard=50)
    target_shards = write_shards(tmp_path / "target", "target", target)  # a target given as shards
    runs = [curate("dsir", shards, "--out", str(tmp_path / f"out{i}"), "--target", target_shards,
                   "--size", "30", "--seed", "3", "--workers", str(workers))[0]
            for i, workers in enumerate((1, 1, 2))]
    assert len(runs[0]) == 30 and runs[0] == runs[1] == runs[2]


CLEAN = [demo_style(7 * i) for i in range(12)]
PLANTED = {  # caption -> the reason it is removed for (with the filters of test_each_filter...)
    "red": "too_short",
    " ".join(demo_style(i) for i in range(6)): "too_long",
    "a red circle!!!!!!!!": "repeated",
    "red red red red red circle": "repeated",
    "stock photo!!!!!!!!": "repeated",  # boilerplate too: the earlier filter names it
    "DSC01234 red circle in the top left": "boilerplate",
    "image may contain: circle, red, top left": "boilerplate",
    "a BadWord circle in the top left": "blocklist",
    "an UGLY   Thing in the top left": "blocklist",
    "ein roter Kreis oben links im Bild": "language",
    "a villain circle in the top left": "classifier",
}
# a blocked word inside another word; a caption too short for langid to be asked
KEPT_TOO = ["a red circle with badwordy style", "ein Kreis"]


def test_each_filter_removes_its_planted_caption_and_nothing_else(tmp_path, monkeypatch):
    helper = tmp_path / "helpers"
    helper.mkdir()
    (helper / "curate_test_scorer.py").write_text(
        "SEEN = []\n\ndef score(captions):\n    SEEN.extend(captions)\n"
        "    return [float('villain' in c) for c in captions]\n")
    monkeypatch.syspath_prepend(str(helper))
    (tmp_path / "block.txt").write_text("badword\n\nugly thing\n")
    captions = CLEAN + list(PLANTED) + KEPT_TOO + [None]
    shards = write_shards(tmp_path / "raw", "raw", captions)
    keep, removed, report = curate(
        "filter", shards, "--out", str(tmp_path / "out"), "--min-tokens", "3", "--max-tokens", "30",
        "--max-repeat", "4", "--blocklist", str(tmp_path / "block.txt"), "--lang", "en",
        "--classifier", "curate_test_scorer:score", "--classifier-threshold", "0.5")
    key = {c: f"raw{i:04d}" for i, c in enumerate(captions)}
    assert {k: r["reason"] for k, r in removed.items()} == {**{key[c]: r for c, r in PLANTED.items()},
                                                            key[None]: "missing_text"}
    assert keep == [key[c] for c in CLEAN + KEPT_TOO]
    assert removed[key["ein roter Kreis oben links im Bild"]]["detail"].startswith("de ")
    import curate_test_scorer

    assert sorted(curate_test_scorer.SEEN) == sorted(CLEAN + KEPT_TOO + ["a villain circle in the top left"])
    stats = report["stats"]
    assert stats["removed_by_filter"] == {"too_short": 1, "too_long": 1, "repeated": 3, "boilerplate": 2,
                                          "blocklist": 2, "language": 1, "classifier": 1}
    assert stats["caption_tokens"]["captions"] == len(captions) - 1 and stats["caption_tokens"]["min"] == 1

    # user boilerplate only: the defaults dropped, "stock photo" and DSC01234 pass
    (tmp_path / "mine.txt").write_text(r"\bvillain\b" + "\n")
    keep, removed, _ = curate("filter", shards, "--out", str(tmp_path / "mine"), "--no-default-boilerplate",
                              "--boilerplate", str(tmp_path / "mine.txt"))
    assert {k: r["reason"] for k, r in removed.items()} == {
        key["a villain circle in the top left"]: "boilerplate", key[None]: "missing_text"}


@pytest.mark.parametrize("argv, says", [
    (["dsir", "--target", "{tmp}/target.txt", "--fraction", "1.5"], "--fraction 1.5"),
    (["dsir", "--target", "{tmp}/missing.txt", "--size", "3"], "not found"),
    (["dsir", "--target", "{tmp}/target.txt", "--size", "3", "--fraction", "0.5"], "exactly one"),
    (["filter", "--no-default-boilerplate"], "no filter given"),
    (["filter", "--lang", "xx"], "--lang xx"),
    (["filter", "--classifier", "no_such_module:f", "--classifier-threshold", "1"], "cannot import"),
    (["filter", "--classifier", "json:loads"], "go together"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, says):
    shards = write_shards(tmp_path, "raw", CLEAN[:2])
    (tmp_path / "target.txt").write_text("a red circle\n")
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main([argv[0], shards, "--out", str(tmp_path / "out"), "--workers", "1", *argv[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and says in err, err
    assert not (tmp_path / "out").exists()


def test_caption_filters_read_captions_only_and_load_no_decoder(tmp_path, monkeypatch):
    import sys
    import tarfile

    shards = write_shards(tmp_path / "raw", "raw", CLEAN[:3] + ["red", None])
    extracted = []
    extractfile = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile",
                        lambda self, m: extracted.append(getattr(m, "name", m)) or extractfile(self, m))
    keep, removed, _ = curate("filter", shards, "--out", str(tmp_path / "out"), "--min-tokens", "3")
    assert keep == ["raw0000", "raw0001", "raw0002"]
    assert {k: r["reason"] for k, r in removed.items()} == {"raw0003": "too_short", "raw0004": "missing_text"}
    assert sorted(extracted) == [f"raw{i:04d}.txt" for i in range(4)]  # no .png read
    # a fresh process filtering loads none of the media decoders' libraries
    code = (f"import sys, json\nfrom mmpretrain.data.curate import main\nassert main(['filter', {shards!r}, "
            f"'--out', {str(tmp_path / 'out2')!r}, '--workers', '1', '--min-tokens', '3']) == 0\n"
            "print(json.dumps(sorted(sys.modules)))")
    proc = run([sys.executable, "-c", code], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = set(json.loads(proc.stdout.splitlines()[-1]))
    assert not loaded & {"mmpretrain.encoders", "timm", "torchvision", "torchaudio", "av", "soundfile", "PIL.Image"}
