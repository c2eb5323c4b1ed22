"""Data curation's media steps on the noisy demo corpus (planted duplicates, mismatched captions):
dedup against the planted truth, pair scores against the model's own encoders, reshard keeping
every member, plans, and training on a uid list."""

import json
from pathlib import Path

import braceexpand
import pytest

from mmpretrain import train
from mmpretrain.config import load_config
from mmpretrain.data.curate import main as curate
from mmpretrain.data.demo_noisy import demo_noisy_corpus
from mmpretrain.pretrained import load_pretrained

from conftest import ROOT
from test_demo_noisy import VARIANTS, read_shards


@pytest.fixture(scope="module")
def noisy(demo_cache):
    paths = demo_noisy_corpus(demo_cache, VARIANTS)
    return paths["train"], json.loads(Path(paths["truth"]).read_text())


@pytest.fixture(scope="module")
def export(demo_cache, tmp_path_factory):
    """A tiny model's export (3 steps of tiny.yaml): the scorer and embedder of these tests."""
    run_dir = tmp_path_factory.mktemp("runs")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.demo.cache_dir={demo_cache}", f"run.dir={run_dir}",
                                                       "train.device=cpu", "data.num_workers=0"])
    train.run(cfg)
    return cfg.run_dir / "export"


def outcome(folder: Path) -> tuple[list[str], list[dict], dict]:
    return ((folder / "keep.txt").read_text().split(),
            [json.loads(line) for line in (folder / "removed.jsonl").read_text().splitlines()],
            json.loads((folder / "report.json").read_text()))


def pairs(removed: list[dict], reason: str) -> set[frozenset]:
    """{removed key, the key it duplicates} for each removal of `reason` (detail "of <key> ...")."""
    return {frozenset((r["key"], r["detail"].split()[1])) for r in removed if r["reason"] == reason}


def test_dedup_finds_the_planted_duplicates_and_keeps_one_of_each(noisy, tmp_path):
    shards, truth = noisy
    # 2 bits, not the default 6: this corpus' distinct samples are one concept's drawings on faint
    # backgrounds, look-alikes by construction (demo_noisy.textured), that 6 bits merge
    assert curate(["dedup", shards, "--out", str(tmp_path / "d"), "--workers", "1", "--max-hamming", "2"]) == 0
    keep, removed, report = outcome(tmp_path / "d")
    exact = {frozenset(p) for p in truth["exact_duplicate"].items()}
    assert pairs(removed, "exact_duplicate") == exact  # every planted copy, nothing else
    near = {frozenset((k, v["of"])): v["how"] for k, v in truth["near_duplicate"].items()}
    found = pairs(removed, "near_duplicate")
    assert len(found & set(near)) / len(found) >= 0.9  # precision
    # pHash survives re-encoding and recolouring, not a crop of a 32-pixel image (dedup.py)
    hashable = {p for p, how in near.items() if how != "cropped"}
    assert len(found & hashable) / len(hashable) >= 0.8
    for p in found | exact:  # one of each group stays
        assert len(p & set(keep)) == 1
    assert report["kept"] == len(keep) == truth["total"] - len(removed)
    assert report["reasons"] == {"exact_duplicate": len(exact), "near_duplicate": len(found)}
    assert "| exact_duplicate |" in (tmp_path / "d" / "report.md").read_text()
    # deterministic, and the same with worker processes
    assert curate(["dedup", shards, "--out", str(tmp_path / "again"), "--workers", "2", "--max-hamming", "2"]) == 0
    assert (tmp_path / "again" / "keep.txt").read_text() == (tmp_path / "d" / "keep.txt").read_text()


def test_semantic_dedup_clusters_embeddings_and_finds_identical_copies(noisy, export, tmp_path):
    shards, truth = noisy
    assert curate(["dedup", shards, "--out", str(tmp_path), "--workers", "1", "--no-exact", "--no-near",
                   "--semantic", str(export), "--threshold", "0.9999", "--clusters", "8"]) == 0
    _, removed, report = outcome(tmp_path)
    found = pairs(removed, "semantic_duplicate")
    # byte-identical copies embed identically; a tiny model after 3 steps calls some variants one too
    assert {frozenset(p) for p in truth["exact_duplicate"].items()} <= found
    assert {r["detail"].split(", ")[-1].rstrip(")") for r in removed} <= {"image", "audio"}
    assert report["stats"]["embedded"] == truth["total"]


def test_score_is_the_models_own_cosine_and_keeps_the_top_fraction(noisy, export, tmp_path):
    shards, truth = noisy
    first = next(iter(braceexpand.braceexpand(shards)))
    assert curate(["score", first, "--out", str(tmp_path), "--workers", "1", "--model", str(export),
                   "--top-fraction", "0.7"]) == 0
    keep, removed, report = outcome(tmp_path)
    scores = {json.loads(l)["key"]: json.loads(l) for l in (tmp_path / "scores.jsonl").read_text().splitlines()}
    assert set(scores) == set(keep) | {r["key"] for r in removed}
    for pair in ("text-image", "text-audio"):
        kept = sum(scores[k][pair] >= report["stats"]["cutoffs"][pair] for k in scores)
        assert kept == pytest.approx(0.7 * len(scores), abs=1)
    assert {r["reason"] for r in removed} == {"low_score"}
    assert (tmp_path / "scores.png").stat().st_size > 0
    # the score is the export's cosine for the sample's caption and media, as load_pretrained gives it
    samples = read_shards(first)
    model, key = load_pretrained(export), keep[0]
    image = model.encode_image(samples[key].get("png") or samples[key]["jpg"])
    text = model.encode_text(samples[key]["txt"].decode())
    assert scores[key]["text-image"] == pytest.approx(float((image * text).sum()), abs=1e-5)


def test_reshard_writes_the_kept_samples_with_every_member(noisy, tmp_path):
    shards, _ = noisy
    every = read_shards(shards)
    chosen = sorted(every)[::3]
    (tmp_path / "uids.txt").write_text("\n".join(chosen) + "\n")
    assert curate(["reshard", shards, "--keep", str(tmp_path / "uids.txt"), "--out", str(tmp_path / "r"),
                   "--max-count", "40"]) == 0
    keep, removed, report = outcome(tmp_path / "r")
    written = read_shards(report["stats"]["pattern"])
    assert sorted(written) == sorted(keep) == chosen and report["stats"]["shards"] == -(-len(chosen) // 40)
    assert all(written[k] == every[k] for k in chosen)  # byte for byte
    assert {r["key"] for r in removed} == set(every) - set(chosen)


def test_a_plan_runs_its_steps_in_order_and_a_second_run_reuses_them(noisy, tmp_path, capsys):
    shards, truth = noisy
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"shards: '{shards}'\nout: {tmp_path / 'cur'}\nworkers: 1\n"
                    "steps:\n  - dedup: {}\n  - filter: {min_tokens: 4}\n  - reshard: {max_count: 1000}\n")
    assert curate(["run", str(plan)]) == 0
    keep, removed, report = outcome(tmp_path / "cur")
    steps = [s["step"] for s in report["steps"]]
    assert steps == ["dedup", "filter", "reshard"]
    assert {r["step"] for r in removed} == {"dedup", "filter"} and len(keep) + len(removed) == truth["total"]
    assert (tmp_path / "cur" / "01-dedup" / "keep.txt").read_text().split() != keep  # filter removed more
    assert sorted(read_shards(str(tmp_path / "cur" / "03-reshard" / "shards" / "train-000000.tar"))) == sorted(keep)
    stamp = (tmp_path / "cur" / "01-dedup" / "report.json").stat().st_mtime_ns
    assert curate(["run", str(plan)]) == 0
    assert (tmp_path / "cur" / "01-dedup" / "report.json").stat().st_mtime_ns == stamp  # done: not run again
    assert (tmp_path / "cur" / "keep.txt").read_text().split() == keep


def test_bad_input_is_one_line_and_exit_2(noisy, tmp_path, capsys):
    shards, _ = noisy
    for argv, says in [(["dedup", shards, "--max-hamming", "40"], "--max-hamming 40"),
                       (["dedup", shards, "--keep", str(tmp_path / "none.txt")], "uid list"),
                       (["dedup", str(tmp_path / "x-{0..3}.tar")], "not found"),
                       (["score", shards, "--model", str(tmp_path), "--top-fraction", "0.5"], "holds no export"),
                       (["score", shards, "--top-fraction", "0.5"], "give one scorer"),
                       (["reshard", shards, "--pattern", "x.tar"], "%d field")]:
        assert curate([*argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and says in err and len(err.splitlines()) == 1, err
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"shards: '{shards}'\nout: {tmp_path / 'p'}\nsteps:\n  - sort: {{}}\n")
    assert curate(["run", str(plan)]) == 2
    assert "step 1 is {'sort': {}}" in capsys.readouterr().err


def test_training_reads_only_the_samples_of_a_uid_list(noisy, tiny_cfg, tmp_path):
    from mmpretrain.data.sources import train_sources
    from mmpretrain.data.stream import _EpochDataset
    from mmpretrain.tokenizer import Tokenizer

    shards, _ = noisy
    chosen = sorted(read_shards(shards))[:40]
    (tmp_path / "keep.txt").write_text("\n".join(chosen))
    cfg = tiny_cfg(f"data.sources=[{{pattern: '{shards}', keep: {tmp_path / 'keep.txt'}}}]", "train.batch_size=8")
    sources = train_sources(cfg.data)
    assert sources[0].keep == frozenset(chosen)
    seen = [k for b in _EpochDataset(sources, cfg, Tokenizer(cfg.model.text), 8, 0, True) for k in b.keys]
    assert sorted(seen) == chosen
    with pytest.raises(Exception, match=r"data.sources\[0\].keep: uid list"):
        train_sources(tiny_cfg(f"data.sources=[{{pattern: '{shards}', keep: {tmp_path / 'gone.txt'}}}]").data)


def test_interleaved_documents_pass_the_pair_steps_untouched(demo_cache, export, tmp_path):
    from mmpretrain.data.demo import demo_corpus

    docs = demo_corpus(demo_cache, 1)["docs"]
    keys = sorted(read_shards(docs))
    for step, options in [("dedup", []), ("score", ["--model", str(export), "--top-fraction", "0.5"])]:
        assert curate([step, docs, "--out", str(tmp_path / step), "--workers", "1", *options]) == 0
        keep, removed, _ = outcome(tmp_path / step)
        assert sorted(keep) == keys and not removed


def test_dedup_hashes_a_videos_middle_frame(tmp_path):
    import random

    import numpy as np
    import webdataset as wds

    from mmpretrain.data.demo_video import VideoConcept, encode_mp4, render_frames

    concepts = [VideoConcept("red", "circle", "moving left"), VideoConcept("blue", "cross", "moving up"),
                VideoConcept("green", "square", "moving down")]
    frames = [render_frames(c, random.Random(i)) for i, c in enumerate(concepts)]
    brighter = [np.clip(f.astype(int) + 4, 0, 255).astype(np.uint8) for f in frames[0]]  # other bytes, same picture
    with wds.TarWriter(str(tmp_path / "v.tar")) as sink:
        for i, (c, f) in enumerate(zip(concepts + concepts[:1], frames + [brighter])):
            sink.write({"__key__": f"v{i}", "mp4": encode_mp4(f, None), "txt": c.caption})
    # H.264 moves the copy's middle-frame hash by a few bits; the other clips are about 30 bits away
    assert curate(["dedup", str(tmp_path / "v.tar"), "--out", str(tmp_path / "d"), "--workers", "1",
                   "--max-hamming", "6"]) == 0
    keep, removed, _ = outcome(tmp_path / "d")
    assert keep == ["v0", "v1", "v2"]
    assert [(r["key"], r["reason"], r["detail"].split()[1]) for r in removed] == [("v3", "near_duplicate", "v0")]


def test_dedup_by_default_finds_edited_copies_of_small_images_and_says_what_its_threshold_means(tmp_path):
    """benchmarks/dedup_threshold.py's generator: look-alike scenes at 64 and 128 px, each copied 8%
    brighter, as JPEG 70, at 75% and cropped + brightened + JPEG (the issue's copy)."""
    import numpy as np
    import webdataset as wds

    from conftest import benchmark

    bench, rng = benchmark("dedup_threshold"), np.random.default_rng(0)
    scenes = []
    for size in (64, 128):
        for _ in range(4):
            where = bench.layout(rng)  # pairs of one layout: look-alikes
            scenes += [bench.scene(rng, size, where) for _ in range(2)]
    edits = ("bright8", "jpeg70", "resize75", "combined")
    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        for n, img in enumerate(scenes):
            sink.write({"__key__": f"s{n:02d}", "png": bench.encode(img), "txt": f"scene {n}"})
        for e in edits:
            for n, img in enumerate(scenes):
                ext = "jpg" if e in ("jpeg70", "combined") else "png"
                sink.write({"__key__": f"s{n:02d}-{e}", ext: bench.edited(img, e), "txt": f"scene {n} again"})
    assert curate(["dedup", str(tmp_path / "s.tar"), "--out", str(tmp_path / "d"), "--workers", "1"]) == 0
    keep, removed, report = outcome(tmp_path / "d")
    near = [(r["key"], r["detail"].split()[1]) for r in removed if r["reason"] == "near_duplicate"]
    assert all(a[:3] == b[:3] for a, b in near)  # every removal a copy of its own scene, no look-alike
    assert len(near) >= 0.9 * len(edits) * len(scenes)  # 2 bits, the old default, found 77%
    assert set(keep) >= {f"s{n:02d}" for n in range(len(scenes))}
    meaning = report["stats"]["near_duplicate_threshold"]
    assert "at most 6 bits" in meaning and "dedup_threshold.py" in meaning and "% of their copies" in meaning
