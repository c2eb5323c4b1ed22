"""inspect, make_shards and overlap on shards made in the test."""

import io
import json
import sys
import tarfile

import numpy as np
import webdataset as wds
from PIL import Image

from mmpretrain.data import inspect as inspect_tool
from mmpretrain.data import make_shards, overlap

from conftest import flac_bytes, run, sample_dict


def smooth_image(seed: int, size=64) -> Image.Image:
    """A smooth random picture (upsampled noise): unrelated for different seeds."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((size, size),
                                                                                  Image.Resampling.BICUBIC)


def encoded(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def write(folder, name, samples) -> str:
    with wds.ShardWriter(str(folder / f"{name}-%06d.tar"), maxcount=1000, verbose=0) as sink:
        for s in samples:
            sink.write(s)
    return str(folder / f"{name}-000000.tar")


def test_inspect_reports_layouts_modalities_skips_and_captions(tmp_path, capsys):
    samples = [sample_dict(i) for i in range(5)]
    samples += [{"__key__": f"clap{i}", "flac": flac_bytes(), "json": json.dumps({"text": "rain falls"})}
                for i in range(3)]
    samples += [{"__key__": "nocap", "png": encoded(smooth_image(0))},
                {"__key__": "broken", "png": b"not a png", "txt": "a broken image"},
                {"__key__": "long", "png": encoded(smooth_image(1)), "txt": "a very long caption " * 10}]
    path = write(tmp_path, "mixed", samples)
    out = tmp_path / "report.json"
    assert inspect_tool.main([path, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["samples"] == 11 and report["shards"] == {path: 11}
    assert report["layouts"]["flac + json + png + txt"] == 5 and report["layouts"]["flac + json"] == 3
    assert report["modalities"] == {"image": 6, "audio": 8}
    assert report["skipped"] == {"missing_text": 1, "bad_image": 1} and report["usable"] == 9
    assert report["caption_tokens"]["truncated_at_context_length"] == 1
    assert "training would skip 2 of 11 sample(s) (18.2%)" in text and "missing_text" in text
    assert inspect_tool.main([str(tmp_path / "none-{0..1}.tar")]) == 2  # missing shards: a clear error


def test_make_shards_from_a_folder_and_from_a_manifest(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    smooth_image(0).save(src / "dog.jpg")
    (src / "dog.txt").write_text("a dog")
    (src / "sub" / "rain.flac").write_bytes(flac_bytes())
    (src / "sub" / "rain.json").write_text(json.dumps({"text": "rain on a roof"}))
    (src / "notes.md").write_text("not a sample")
    proc = run([sys.executable, "-m", "mmpretrain.data.make_shards", str(src), "--out",
                str(tmp_path / "out" / "f-%04d.tar"), "--max-count", "1"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote 2 sample(s) in 2 shard(s): {tmp_path / 'out' / 'f-{0000..0001}.tar'}" in proc.stdout
    got = {s["__key__"]: s for u in ("f-0000.tar", "f-0001.tar")
           for s in wds.WebDataset(str(tmp_path / "out" / u), shardshuffle=False)}
    assert set(got) == {"dog", "sub_rain"} and got["dog"]["txt"] == b"a dog"
    assert got["dog"]["jpg"] == (src / "dog.jpg").read_bytes()  # members keep their bytes
    with tarfile.open(tmp_path / "out" / "f-0000.tar") as tar:  # plain ustar: no pax header per member
        assert [m.pax_headers for m in tar.getmembers()] == [{}, {}]
    report = inspect_tool.inspect([str(tmp_path / "out" / "f-0000.tar"), str(tmp_path / "out" / "f-0001.tar")],
                                  __import__("mmpretrain.config", fromlist=["x"]).load_config(), progress=False)
    assert report["usable"] == 2 and report["modalities"] == {"image": 1, "audio": 1}

    (tmp_path / "m").mkdir()
    smooth_image(1).save(tmp_path / "m" / "a.png")
    (tmp_path / "m" / "a.flac").write_bytes(flac_bytes())
    manifest = tmp_path / "m" / "rows.jsonl"
    manifest.write_text(json.dumps({"path": "a.png", "caption": "both", "audio": "a.flac"}) + "\n" +
                        json.dumps({"path": "a.flac", "caption": "sound only"}) + "\n")
    written = make_shards.write_shards((s for _, s in make_shards.samples_from_manifest(manifest)),
                                       str(tmp_path / "mm-%02d.tar"),
                                       max_count=10, max_size_mb=100, progress=False)
    rows = list(wds.WebDataset(written[0], shardshuffle=False))
    assert [sorted(k for k in r if not k.startswith("__")) for r in rows] == [["flac", "png", "txt"], ["flac", "txt"]]
    bad = tmp_path / "m" / "bad.csv"
    bad.write_text("file,text\na.png,x\n")
    assert make_shards.main([str(bad), "--out", str(tmp_path / "b-%02d.tar")]) == 2


def test_overlap_finds_planted_duplicates_and_nothing_else(tmp_path, capsys):
    train = [{"__key__": f"t{i}", "png": encoded(smooth_image(i)), "txt": f"training picture number {i} of many"}
             for i in range(40)]
    evals = [{"__key__": f"e{i}", "png": encoded(smooth_image(1000 + i)), "txt": f"held out scene {i} alone"}
             for i in range(10)]
    evals[1]["png"] = train[3]["png"]  # the same bytes
    evals[2]["png"] = encoded(smooth_image(7).resize((56, 56)), "JPEG", quality=85)  # re-encoded, resized
    evals[3]["txt"] = "Training picture number 12, of many!"  # the same caption, other case/punctuation
    evals[4]["txt"] = "training picture number 20 of many now"  # one word more
    evals[5]["png"] = encoded(Image.fromarray(255 - np.asarray(smooth_image(9))))  # colours inverted: not one
    out = tmp_path / "overlap.json"
    assert overlap.main(["--train", write(tmp_path, "train", train), "--eval", write(tmp_path, "eval", evals),
                         "--json", str(out)]) == 0
    report = json.loads(out.read_text())["overlap"]
    assert report == {"e1": {"identical_media": ["t3"]}, "e2": {"near_duplicate_image": ["t7"]},
                      "e3": {"identical_caption": ["t12"]}, "e4": {"near_identical_caption": ["t20"]}}
    assert "4 of 10 eval item(s) overlap 40 training sample(s)" in capsys.readouterr().out


def test_make_shards_refuses_empty_and_uncaptioned_inputs_and_leaves_no_partial_shard(tmp_path, capsys):
    def make(source, name) -> tuple[int, str, list[str]]:
        out = tmp_path / name
        code = make_shards.main([str(source), "--out", str(out / "s-%02d.tar"), "--max-count", "1"])
        err = capsys.readouterr().err
        return code, err, sorted(p.name for p in out.iterdir()) if out.exists() else []

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("no media here")
    code, err, files = make(tmp_path / "empty", "o1")
    assert code == 2 and "no media files" in err and len(err.strip().splitlines()) == 1 and files == []

    src = tmp_path / "src"
    src.mkdir()
    smooth_image(0).save(src / "a.png")
    (src / "a.txt").write_text("a picture")
    smooth_image(1).save(src / "b.png")  # no caption
    code, err, files = make(src, "o2")
    assert code == 2 and "b.png" in err and "caption" in err and files == []  # the open shard is removed

    smooth_image(2).save(src / "c.png")
    rows = src / "rows.csv"
    rows.write_text("path,caption\na.png,a picture\nb.png,another\nc.png,\n")  # line 4: no caption
    code, err, files = make(rows, "o3")
    assert code == 2 and "line 4" in err and "caption" in err and files == ["s-00.tar"]  # complete ones stay
    kept = wds.WebDataset(str(tmp_path / "o3" / "s-00.tar"), shardshuffle=False)
    assert [s["txt"] for s in kept] == [b"a picture"]
    rows.write_text("path,caption\na.png,a picture\nmissing.png,gone\n")
    code, err, files = make(rows, "o4")
    assert code == 2 and "line 3" in err and "missing.png" in err and "Traceback" not in err
    assert files == []
    rows.write_text("path,caption\n")
    code, err, files = make(rows, "o5")
    assert code == 2 and "no rows" in err and files == []
    lines = src / "rows.jsonl"
    lines.write_text(json.dumps({"path": "a.png", "caption": "a picture"}) + "\n{not json\n")
    code, err, files = make(lines, "o6")
    assert code == 2 and "line 2" in err and files == []


def test_make_shards_checks_decoding_skips_bad_files_by_reason_and_holds_out_by_key(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        smooth_image(i, size=16).save(src / f"p{i:02d}.png")
        (src / f"p{i:02d}.txt").write_text(f"picture {i}")
    (src / "broken.png").write_bytes(b"not a png at all")
    (src / "broken.txt").write_text("a broken picture")
    (src / "cut.png").write_bytes(encoded(smooth_image(98))[:60])  # truncated: its header reads, its pixels do not
    (src / "cut.txt").write_text("a cut picture")

    def make(name, *flags) -> tuple[int, list[str], list[str]]:
        code = make_shards.main([str(src), "--out", str(tmp_path / name / "train-%03d.tar"), "--max-count", "8",
                                 *flags])
        out, err = capsys.readouterr()
        return code, out.strip().splitlines(), err.strip().splitlines()

    code, out, err = make("strict")
    assert code == 2 and len(err) == 1 and "broken.png" in err[0] and "bad_image" in err[0]  # found at pack time
    assert "--skip-bad" in err[0] and not list((tmp_path / "strict").glob("*.tar*"))
    smooth_image(99).save(src / "nocap.png")

    def keys(pattern) -> list[str]:
        import braceexpand

        return [s["__key__"] for u in braceexpand.braceexpand(pattern) for s in wds.WebDataset(u, shardshuffle=False)]

    code, out, err = make("a", "--skip-bad", "--eval-fraction", "0.25")
    assert code == 0 and err == []
    assert out[0] == "skipped 3 sample(s) (--skip-bad): bad_image 2, missing_text 1"
    held, wrote = out[1].split(": ")[-1], out[2].split(": ")[-1]
    n = 40 - len(keys(held))
    assert out[2].startswith(f"wrote {n} sample(s) in ") and wrote.endswith(f"train-{{000..{(n - 1) // 8:03d}}}.tar")
    assert out[1].startswith(f"held out {len(keys(held))} sample(s) in ") and "/eval-{000..00" in held
    train, test = keys(wrote), keys(held)
    assert sorted(train + test) == [f"p{i:02d}" for i in range(40)] and 4 <= len(test) <= 18
    # the split is the keys' hash: the same on a rerun, and a larger fraction only adds to it
    assert make("b", "--skip-bad", "--eval-fraction", "0.25")[1][1:] == [
        line.replace(f"{tmp_path}/a/", f"{tmp_path}/b/") for line in out[1:]]
    code, out, _ = make("c", "--skip-bad", "--eval-fraction", "0.5", "--eval-out", str(tmp_path / "c" / "ho-%d.tar"))
    assert code == 0 and set(test) < set(keys(out[1].split(": ")[-1])) and "/ho-{0.." in out[1]


def test_make_shards_writes_a_classification_set_from_an_image_folder_tree(tmp_path, capsys):
    from mmpretrain.eval.classify import read_classnames, read_samples, read_templates, split_shards

    tree = tmp_path / "pets"
    for c, name in enumerate(("tabby_cat", "dog")):
        (tree / name / "sub").mkdir(parents=True)
        for i in range(6):
            smooth_image(10 * c + i, size=16).save(tree / name / ("sub" if i == 5 else "") / f"{i}.png")
    (tree / "dog" / "bad.png").write_bytes(b"not a png")
    (tree / "readme.txt").write_text("not a class")
    out = tmp_path / "sets" / "pets"
    assert make_shards.main([str(tree), "--classes", "--out", str(out)]) == 2
    assert "bad.png" in capsys.readouterr().err
    assert make_shards.main([str(tree), "--classes", "--out", str(out), "--skip-bad", "--eval-fraction", "0.5",
                             "--template", "a photo of a {c}.", "--template", "a {c}"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "skipped 1 sample(s) (--skip-bad): bad_image 1" and lines[-1].startswith("wrote 12 sample(s) of 2")
    assert read_classnames(out) == ["dog", "tabby cat"]  # ImageFolder's order: the sorted folder names
    assert read_templates(out) == ["a photo of a {c}.", "a {c}"]
    labels = {}
    for split in ("train", "test"):
        for _, sample in read_samples(split_shards(out, split)):
            labels[sample["png"]] = int(sample["cls"])
    assert len(labels) == 12
    for c, name in enumerate(("dog", "tabby_cat")):
        for path in (tree / name).rglob("[0-9].png"):
            assert labels[path.read_bytes()] == c
    assert make_shards.main([str(tree / "dog"), "--classes", "--out", str(out)]) == 2  # other classes: refused
    assert "other classes" in capsys.readouterr().err


def bad_shards(tmp_path) -> list[str]:
    """Shards with one bad sample of each kind and shards that are not (all) readable tars."""
    good = sample_dict(0)
    mixed = write(tmp_path, "mixed", [good, {"__key__": "broken", "png": b"not a png", "txt": "broken"},
                                      {"__key__": "nocap", "png": good["png"]}])
    full = (tmp_path / "mixed-000000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(full[: len(full) // 2])
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "text.tar").write_text("not a tar at all " * 40)
    return [mixed] + [str(tmp_path / n) for n in ("cut.tar", "empty.tar", "text.tar")]


def test_inspect_names_bad_samples_and_bad_shards(tmp_path, capsys):
    urls = bad_shards(tmp_path)
    out = tmp_path / "report.json"
    pattern = str(tmp_path / "{mixed-000000,cut,empty,text}.tar")
    assert inspect_tool.main([pattern, "--json", str(out), "--list-bad"]) == 0
    text = capsys.readouterr().out
    bad = json.loads(out.read_text())["bad"]
    by_key = {(b["shard"], b["key"]): b["reason"] for b in bad}
    assert by_key[(urls[0], "broken")] == "bad_image" and by_key[(urls[0], "nocap")] == "missing_text"
    assert {b["shard"] for b in bad if b["reason"] == "bad_tar"} == set(urls[1:])
    assert all(b["key"] is None for b in bad if b["reason"] == "bad_tar")
    for b in bad:  # --list-bad: one line per bad sample or shard, naming both
        assert any(b["shard"] in line and (b["key"] or "") in line and b["reason"] in line
                   for line in text.splitlines())
    assert "object at 0x" not in text and "<_io." not in text
    assert "3 shard(s) with tar errors" in text
    # only bad shards: the summary says so, not "skip 0"
    assert inspect_tool.main([str(tmp_path / "{empty,text}.tar")]) == 0
    text = capsys.readouterr().out
    assert "skip 0" not in text and "2 shard(s) with tar errors" in text


def test_skip_warnings_name_shard_and_key_without_object_reprs(tiny_cfg, tmp_path, caplog):
    from mmpretrain.data import eval_batches
    from mmpretrain.tokenizer import Tokenizer

    cfg = tiny_cfg()
    urls = bad_shards(tmp_path)
    with caplog.at_level("WARNING", logger="mmpretrain.data.samples"):
        list(eval_batches(urls, cfg, Tokenizer(cfg.model.text), batch_size=4))
    warnings = [r.getMessage() for r in caplog.records if r.name == "mmpretrain.data.samples"]
    assert any(urls[0] in w and "broken" in w and "bad_image" in w for w in warnings)
    assert any(urls[0] in w and "nocap" in w and "missing_text" in w for w in warnings)
    for url in urls[1:]:
        assert any(url in w and "bad_tar" in w for w in warnings), url
    assert not [w for w in warnings if "object at 0x" in w or "<_io." in w]


def test_overlap_fails_above_the_threshold_set(tmp_path, capsys):
    train = [{"__key__": f"t{i}", "png": encoded(smooth_image(i)), "txt": f"training picture number {i}"}
             for i in range(4)]
    evals = [{"__key__": f"e{i}", "png": encoded(smooth_image(100 + i)), "txt": f"held out scene {i} alone"}
             for i in range(4)]
    evals[0]["png"] = train[0]["png"]  # 1 of 4 eval items contaminated: 25%
    args = ["--train", write(tmp_path, "train", train), "--eval", write(tmp_path, "eval", evals)]
    assert overlap.main(args + ["--fail-above", "0.25"]) == 0
    capsys.readouterr()
    assert overlap.main(args + ["--fail-above", "0.2"]) == 1
    assert "25.0% of eval items overlap, above --fail-above 0.2" in capsys.readouterr().err
    assert overlap.main(args + ["--fail-above", "1.5"]) == 2  # a fraction: a clear error
    assert "--fail-above" in capsys.readouterr().err
