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
    assert "training would skip 2 (18.2% of samples)" in text and "missing_text" in text
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
    assert f"wrote 2 shard(s): {tmp_path / 'out' / 'f-{0000..0001}.tar'}" in proc.stdout
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
    written = make_shards.write_shards(make_shards.samples_from_manifest(manifest), str(tmp_path / "mm-%02d.tar"),
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
