import json
import re
import struct
import subprocess
import sys

import pytest
import torch
import webdataset as wds

import mmpretrain
from mmpretrain import train
from mmpretrain.checkpoint import checkpoint_dirs, latest_checkpoint, read_tensors
from mmpretrain.config import ConfigError

from conftest import assert_same_run, ROOT, run, run_until_crash, sample_dict, small_eval_shard


def read_metrics(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """The event files in `folder`, read as TensorBoard reads them: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_in_tensorboard(records: list[dict], folder) -> set[str]:
    """The event files in `folder` hold each metric of the jsonl `records` at its step (as float32),
    tagged by its keys ("temperature/text-image"), and nothing else (not an evaluation's n, classes
    or weight_decay; no step twice after a resume) -> the tags."""
    def numbers(tree, prefix=""):
        for k, v in tree.items():
            if isinstance(v, dict):
                yield from numbers(v, f"{prefix}{k}/")
            elif isinstance(v, (int, float)) and k not in ("n", "classes", "weight_decay"):
                yield prefix + k, v

    expected = {}
    for r in records:
        for tag, v in numbers({k: v for k, v in r.items() if k != "step"}):
            expected.setdefault(tag, []).append((r["step"], struct.unpack("f", struct.pack("f", v))[0]))
    assert tensorboard_scalars(folder) == expected
    return set(expected)


def test_tensorboard_tags_sources_by_name_or_index_and_charts_metrics_only(tmp_path):
    """A source is charted by its name, or its index in data.sources, never by its shard pattern; an
    evaluation's metrics are charted, not its set's size, classes or the probe's weight decay."""
    from mmpretrain.config import load_config
    from mmpretrain.runlog import RunLog, source_tags

    cfg = load_config(None, ["data.sources=[{pattern: 'laion/train-{000..009}.tar'}, {pattern: cc.tar, name: cc}]"])
    log = RunLog(tmp_path, True, tags=source_tags(cfg.data.sources))
    log.metrics({"step": 1, "loss": 2.0, "source_share": {"laion/train-{000..009}.tar": 0.25, "cc": 0.75}})
    log.eval(1, {"retrieval": {"text->image": {"R@1": 0.5, "n": 100}},
                 "shapes-probe": {"acc1": 0.75, "n": 100, "weight_decay": 0.01, "classes": 6}})
    log.close()
    assert tensorboard_scalars(tmp_path / "tb" / "train") == {"loss": [(1, 2.0)], "source_share/0": [(1, 0.25)],
                                                              "source_share/cc": [(1, 0.75)]}
    assert tensorboard_scalars(tmp_path / "tb" / "eval") == {"retrieval/text->image/R@1": [(1, 0.5)],
                                                             "shapes-probe/acc1": [(1, 0.75)]}
    assert json.loads((tmp_path / "eval" / "history.jsonl").read_text())["shapes-probe"]["classes"] == 6  # kept


def test_curves_tell_the_two_directions_apart_and_draw_each_pairs_chance(tmp_path):
    """curves.png's retrieval panel: a pair's two directions in one colour, told apart by line and
    marker (equal recalls stay visible), and chance at 1 / the items each pair ranks: one line per
    distinct count (two captions per image: text->image's n counts 200 queries of 100 images)."""
    from mmpretrain.plots import curves_figure

    def result(n_items, captions=1):
        return {"R@1": 0.3, "n": n_items * captions}

    (tmp_path / "eval").mkdir()
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    history = {"step": 1, "retrieval": {"text->image": result(100, 2), "image->text": result(100),
                                        "text->audio": result(100), "audio->text": result(100)},
               "audio-only": {"text->audio": result(40), "audio->text": result(40)}}
    (tmp_path / "eval" / "history.jsonl").write_text(json.dumps(history) + "\n")
    ax = curves_figure(tmp_path).axes[1]
    lines = {line.get_label(): line for line in ax.get_lines()}
    style = lambda label: (lines[label].get_linestyle(), lines[label].get_marker())  # noqa: E731
    for a, b in (("text", "image"), ("text", "audio")):
        forth, back = f"retrieval {a}->{b}", f"retrieval {b}->{a}"
        assert style(forth) != style(back) and lines[forth].get_color() == lines[back].get_color()
    assert style("audio-only text->audio") != style("audio-only audio->text")
    chance = sorted(line.get_ydata()[0] for label, line in lines.items() if label.startswith("chance"))
    assert chance == [1 / 100, 1 / 40]


def test_smoke_run_through_the_real_entry_point(demo_cache, tmp_path):
    """`python -m mmpretrain.train` for 3 steps, then the eval script and load_pretrained on its output."""
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "mmpretrain.train", str(ROOT / "configs" / "tiny.yaml"),
           f"data.demo.cache_dir={demo_cache}", f"run.dir={runs}", "run.name=smoke", "train.device=cpu",
           "log.peak_tflops=0.5"]  # a CPU has no known peak: given, the metrics carry mfu
    proc = run(cmd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "text->image" in proc.stdout and "text->audio" in proc.stdout
    run_dir = runs / "smoke"
    for name in ("config.yaml", "metrics.jsonl", "eval/retrieval.json", "curves.png",
                 "export/model.safetensors", "export/image/model.safetensors", "export/text/config.json"):
        assert (run_dir / name).exists(), name
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(0 <= m["data_wait"] <= 1 for m in metrics)
    for key in ("loss", "lr", "samples_per_s", "data_wait", "next_token", "contrastive/text-image",
                "contrastive/text-audio"):
        assert key in metrics[0], key
    results = json.loads((run_dir / "eval" / "retrieval.json").read_text())
    assert {"text->image", "image->text", "text->audio", "audio->text"} <= set(results)
    assert set(results["text->image"]) == {"R@1", "R@5", "R@10", "n"} and results["text->image"]["n"] == 100
    assert latest_checkpoint(run_dir).name == "step_00000003"
    tags = assert_in_tensorboard(metrics, run_dir / "tb" / "train")
    assert {"loss", "next_token", "contrastive/text-image", "lr", "grad_norm", "samples_per_s", "tokens_per_s",
            "data_wait", "temperature/image-audio", "temperature/text-image", "temperature/text-audio",
            "memory/peak_rss_gib", "model_tflops_per_s", "mfu"} <= tags, tags
    # FLOPs counted on step 1: the model's per-device TFLOP/s (a tiny model on 2 cores: well under 1)
    assert all(0 < m["model_tflops_per_s"] < 1 and m["mfu"] == pytest.approx(m["model_tflops_per_s"] / 0.5)
               for m in metrics)
    assert all(0 < m["temperature"]["text-image"] < 1 and m["memory"]["peak_rss_gib"] > 0.1 for m in metrics)
    history = [json.loads(l) for l in (run_dir / "eval" / "history.jsonl").read_text().splitlines()]
    assert "retrieval/text->image/R@1" in assert_in_tensorboard(history, run_dir / "tb" / "eval")
    # zero-shot classification and linear probes of the demo corpus's classification sets, beside retrieval
    assert "\nclassification (zero-shot" in proc.stdout
    for name, classes in (("image-shape", 6), ("audio-rhythm", 6)):
        for set_name, kind in ((name, "zero-shot"), (f"{name}-probe", "linear-probe")):
            row = re.search(rf"^{set_name} .*$", proc.stdout, re.M).group(0).split()
            assert row[1:4] == [kind, name.split("-")[0], str(classes)] and float(row[5]) == round(1 / classes, 3)
            result = json.loads((run_dir / "eval" / f"{set_name}.json").read_text())
            assert result["n"] == 100 and f"{result['acc1']:.3f}" == row[4]

    out = tmp_path / "again.json"
    proc = run([sys.executable, "-m", "mmpretrain.eval.retrieval", "--run", str(run_dir), "--out", str(out),
                "--device", "cpu"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "text->audio" in proc.stdout
    assert json.loads(out.read_text()) == results  # the export reproduces the end-of-run eval


def test_load_pretrained_and_single_encoders(tiny_cfg):
    cfg = tiny_cfg("train.steps=1", "run.name=export")
    train.run(cfg)
    export = cfg.run_dir / "export"
    model = mmpretrain.load_pretrained(export)
    from PIL import Image
    img = Image.new("RGB", (40, 30), (255, 0, 0))
    e_img = model.encode_image([img, img])
    e_txt = model.encode_text(["a red circle in the centre", "a blue ring"])
    e_aud = model.encode_audio(torch.randn(2, 44100), sample_rate=44100)
    for e in (e_img, e_txt, e_aud):
        assert e.shape == (2, cfg.model.fusion.embed_dim)
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))
    image_tower = mmpretrain.load_encoder(export / "image")
    with torch.no_grad():
        alone = image_tower(image_tower.preprocess([img]))[1]
    torch.testing.assert_close(alone[0], e_img[0])
    text_only = mmpretrain.load_encoder(export / "text")
    torch.testing.assert_close(text_only.encode_text(["a blue ring"])[0], e_txt[1])


def test_eval_and_downstream_paths_with_a_bf16_only_kernel(tiny_cfg, bf16_only_varlen):
    """What crashed on the GPU: fp32 evaluation (mid-training and final) and fp32 `encode_*`
    through a kernel that takes only bf16 (flash varlen), forced here on CPU."""
    cfg = tiny_cfg("model.attention.backend=varlen", "train.precision=fp32", "train.steps=2",
                   "train.eval_every=1", "run.name=bf16only")
    results = train.run(cfg)
    assert results["text->image"]["n"] == 100 and bf16_only_varlen
    model = mmpretrain.load_pretrained(cfg.run_dir / "export")
    texts = ["a red circle in the centre", "a blue ring in the top left"]
    fake = model.encode_text(texts)
    for block in model.model.decoder.blocks:
        block.attention.backend = "sdpa"  # the same weights through an fp32 kernel
    torch.testing.assert_close(fake, model.encode_text(texts), rtol=3e-2, atol=3e-2)
    text_tower = mmpretrain.load_encoder(cfg.run_dir / "export" / "text")
    assert text_tower.encode_text(texts).dtype == torch.float32


def test_resume_is_exact(tiny_cfg, monkeypatch, tmp_path):
    steps = ["train.steps=5", "train.checkpoint_every=2", "train.keep_checkpoints=1",
             f"data.eval_sources=[{small_eval_shard(tmp_path)}]"]  # the final evaluations: unchecked here
    full = tiny_cfg(*steps, "run.name=full")
    train.run(full)
    reference = [m["loss"] for m in read_metrics(full.run_dir)]

    cut = tiny_cfg(*steps, "run.name=cut")
    run_until_crash(cut, after_step=3)
    assert [p.name for p in checkpoint_dirs(cut.run_dir)] == ["step_00000002"]
    assert [m["step"] for m in read_metrics(cut.run_dir)] == [1, 2, 3]

    train.run(cut)  # resume=auto picks step 2; step 3 is redone
    resumed = read_metrics(cut.run_dir)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5]
    assert_same_run([m["loss"] for m in resumed], reference)
    assert_in_tensorboard(resumed, cut.run_dir / "tb" / "train")  # the first session's step 3 hidden


def write_shards(folder, name: str, samples: int, per_shard: int) -> str:
    """Demo samples in webdataset shards written here -> their brace pattern."""
    with wds.ShardWriter(str(folder / f"{name}-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(samples):
            sink.write(sample_dict(i))
    return str(folder / f"{name}-{{000000..{(samples - 1) // per_shard:06d}}}.tar")


def write_partial_shards(folder, name: str, samples: int, drop: tuple[str, ...]) -> str:
    """One shard of demo samples without the media in `drop` ("png", "flac") -> its path."""
    with wds.TarWriter(str(folder / f"{name}.tar")) as sink:
        for i in range(samples):
            sink.write({k: v for k, v in sample_dict(i).items() if k not in drop})
    return str(folder / f"{name}.tar")


@pytest.mark.parametrize("data", ["image-only", "image-or-audio"])
def test_resume_when_a_tower_or_a_pair_saw_no_data(tiny_cfg, tmp_path, caplog, data):
    """Own data that trains some parameters only (the audio tower on image-only shards; the
    image-audio temperature where no sample has both): the first run says what saw no data, and
    its checkpoint, where those parameters have no optimizer state, resumes: with more steps (the
    schedule's change said), or after a crash to the weights of the uninterrupted run, bit for bit."""
    images = write_partial_shards(tmp_path, "images", 16, ("flac",))
    sources = [images] if data == "image-only" else [images, write_partial_shards(tmp_path, "audio", 16, ("png",))]
    own = [f"data.sources=[{', '.join(sources)}]", f"data.eval_sources=[{images}]", "train.batch_size=8"]
    said = {"image-only": "no sample of the first 1 steps has audio: the audio tower(s) do not train "
                          "(model.modalities=[image] leaves them out)",
            "image-or-audio": "no sample of the first 2 steps has both sides of image-audio: the pair's temperature "
                              "does not train (objectives.media_pairs=false leaves out the media pairs)"}[data]
    with caplog.at_level("INFO", logger="mmpretrain"):
        if data == "image-only":  # train.steps=1, then the same command with train.steps=3
            train.run(tiny_cfg(*own, "train.steps=1", "run.name=cut"))
            assert said in caplog.messages
            train.run(tiny_cfg(*own, "train.steps=3", "run.name=cut"))
            assert "train.steps=3, the checkpoint's run had 1: the learning-rate schedule" in caplog.text
            assert [m["step"] for m in read_metrics(tmp_path / "runs" / "cut")] == [1, 2, 3]
            return
        cut = tiny_cfg(*own, "train.steps=3", "train.checkpoint_every=1", "run.name=cut")
        run_until_crash(cut, after_step=1)
        train.run(cut)  # from step 1: the session's first 2 steps
        assert said in caplog.messages
    assert "resumed from" in caplog.text and "the checkpoint's run had" not in caplog.text
    whole = tiny_cfg(*own, "train.steps=3", "run.name=whole")
    train.run(whole)
    resumed, uninterrupted = (read_tensors(latest_checkpoint(c.run_dir), "") for c in (cut, whole))
    assert resumed.keys() == uninterrupted.keys()
    assert [k for k in resumed if not torch.equal(resumed[k], uninterrupted[k])] == []


def test_resume_at_the_end_of_an_epoch_goes_on_to_the_next(demo_cache, tmp_path):
    """96 samples in 3 shards, batches of 16: 6 steps (one epoch, nothing left over), then the same
    command with train.steps=8 resumes into the second epoch, where 8 steps in one go stand."""
    sources = f"data.sources=[{write_shards(tmp_path, 'train', 96, 32)}]"
    tiny = [str(ROOT / "configs" / "tiny.yaml"), f"data.demo.cache_dir={demo_cache}", f"run.dir={tmp_path / 'runs'}",
            "train.device=cpu", "data.num_workers=0", sources, "train.batch_size=16",
            f"data.eval_sources=[{small_eval_shard(tmp_path)}]"]  # the final evaluations: unchecked here
    for name, steps in (("b", 6), ("b", 8), ("whole", 8)):
        assert train.main([*tiny, f"run.name={name}", f"train.steps={steps}"]) == 0
    assert [m["step"] for m in read_metrics(tmp_path / "runs" / "b")] == list(range(1, 9))
    resumed, whole = (torch.load(latest_checkpoint(tmp_path / "runs" / name) / "rank_00000.pt", weights_only=True)
                      for name in ("b", "whole"))
    assert resumed["data"] == whole["data"] and resumed["data"]["epoch"] == 1  # the same samples read


def test_a_refused_config_writes_nothing_into_the_run_folder(tiny_cfg):
    """A resume refused (another model) leaves the run folder as it was, config.yaml included, and
    makes no folder for a new run."""
    first = tiny_cfg("train.steps=1", "run.name=first")
    train.run(first)

    def files(folder):
        return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    before = files(first.run_dir)
    with pytest.raises(ConfigError, match="another model"):
        train.run(tiny_cfg("train.steps=2", "run.name=first", "model.decoder.width=64"))
    assert files(first.run_dir) == before
    other = tiny_cfg("run.name=other", f"train.resume={latest_checkpoint(first.run_dir)}", "model.decoder.width=64")
    with pytest.raises(ConfigError, match="another model"):
        train.run(other)
    assert not other.run_dir.exists()


def test_resume_on_other_data_sources_is_refused_unless_the_data_is_reset(tiny_cfg, tmp_path):
    """Data positions belong to the checkpoint's sources: other sources are refused, naming both
    lists; train.resume_data=reset starts the data afresh and keeps the weights, optimizer and step
    (and a checkpoint of these same sources then resumes its data as usual)."""
    small = f"data.eval_sources=[{small_eval_shard(tmp_path)}]"  # no run's evaluation is checked here
    first = tiny_cfg("train.steps=2", "run.name=data", small)
    train.run(first)
    pattern = write_shards(tmp_path, "other", 32, 32)
    moved = ["run.name=data", f"data.sources=[{pattern}]", small]
    with pytest.raises(ConfigError, match=r"data.sources.*\[demo\].*" + re.escape(f"[{pattern}]")):
        train.run(tiny_cfg(*moved, "train.steps=3"))
    for steps in (3, 4):
        train.run(tiny_cfg(*moved, f"train.steps={steps}", "train.resume_data=reset"))
        ckpt = latest_checkpoint(first.run_dir)
        data = torch.load(ckpt / "rank_00000.pt", weights_only=True)["data"]
        assert (data["epoch"], data["batch_in_epoch"], data["drawn"]) == (0, steps - 2, {pattern: 16 * (steps - 2)})
        optimizer_steps = {v.item() for k, v in read_tensors(ckpt, "optimizer.state.").items() if k.endswith(".step")}
        assert optimizer_steps == {steps}
    assert [m["step"] for m in read_metrics(first.run_dir)] == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="train.resume_data"):
        tiny_cfg("train.resume_data=restart")


def test_nonfinite_loss_stops_with_step_and_term(tiny_cfg, monkeypatch):
    cfg = tiny_cfg("run.name=nan")
    from mmpretrain.objectives import Objectives
    real = Objectives.forward

    def poisoned(self, out, batch=None):
        loss, terms = real(self, out, batch)
        terms["next_token"] = terms["next_token"] * float("nan")
        return loss * float("nan"), terms

    monkeypatch.setattr(Objectives, "forward", poisoned)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 1 in next_token"):
        train.run(cfg)


def test_sigterm_checkpoints_the_last_step_and_resumes(demo_cache, tmp_path):
    import signal
    import time

    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "mmpretrain.train", str(ROOT / "configs" / "tiny.yaml"),
           f"data.demo.cache_dir={demo_cache}", f"run.dir={runs}", "run.name=pre", "train.steps=100000",
           "train.device=cpu", f"data.eval_sources=[{small_eval_shard(tmp_path)}]"]  # the resumed run's: unchecked
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = runs / "pre" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the run did not stop within 120 s of SIGTERM")
    assert proc.returncode == 143, err[-2000:]
    assert "run the same command again to resume" in err
    last = read_metrics(runs / "pre")[-1]["step"]
    assert latest_checkpoint(runs / "pre").name == f"step_{last:08d}"
    cfg_args = [a for a in cmd[3:] if not a.startswith("train.steps")] + [f"train.steps={last + 2}"]
    assert train.main(cfg_args) == 0
    assert [m["step"] for m in read_metrics(runs / "pre")][-3:] == [last, last + 1, last + 2]


def test_continued_pretraining_from_an_export_or_a_checkpoint(tiny_cfg, caplog, tmp_path):
    """A new run starts from another run's weights (a new modality initialised afresh, and listed),
    with a fresh optimizer, schedule and step count."""
    from safetensors.torch import load_file

    small = f"data.eval_sources=[{small_eval_shard(tmp_path)}]"  # no run's evaluation is checked here
    first = tiny_cfg("train.steps=2", "run.name=first", small)
    train.run(first)
    exported = load_file(first.run_dir / "export" / "model.safetensors")
    video = ["model.modalities=[image, audio, video]", "model.video.num_frames=4", "model.video.width=32",
             "model.video.heads=2", "model.video.depth=1", "train.steps=1", small]
    cont = tiny_cfg(*video, "run.name=continued", f"train.init_from={first.run_dir / 'export'}",
                    "train.lr=0", "train.weight_decay=0")  # lr 0: the weights stay as loaded
    with caplog.at_level("INFO"):
        train.run(cont)
    after = load_file(cont.run_dir / "export" / "model.safetensors")
    for key in ("towers.image.encoder.vit.blocks.0.attn.qkv.weight", "decoder.embed.weight"):
        assert torch.equal(after[key], exported[key]), key
    message = next(r.message for r in caplog.records if "train.init_from" in r.message)
    assert "initialised afresh: objectives.logit_scale, towers.video" in message  # an export has no temperatures
    assert [m["step"] for m in read_metrics(cont.run_dir)] == [1]

    ckpt = latest_checkpoint(first.run_dir)
    again = tiny_cfg("train.steps=1", "run.name=from_ckpt", f"train.init_from={ckpt}", "train.lr=0",
                     "train.weight_decay=0", small)
    train.run(again)
    state, resumed = read_tensors(ckpt, "task."), read_tensors(latest_checkpoint(again.run_dir), "task.")
    assert torch.equal(resumed["objectives.logit_scale.text-image"], state["objectives.logit_scale.text-image"])
    steps = read_tensors(latest_checkpoint(again.run_dir), "optimizer.state.")
    assert all(v.item() == 1 for k, v in steps.items() if k.endswith(".step"))  # a fresh optimizer
    assert train.main([str(ROOT / "configs" / "tiny.yaml"), f"run.dir={first.run.dir}", "train.init_from=/nowhere",
                       f"data.demo.cache_dir={first.data.demo.cache_dir}"]) == 2


def test_print_config_with_overrides_and_no_config_file(capsys):
    """`--print-config key=value` alone: the built-in defaults with the overrides, as --help says."""
    from mmpretrain.config import load_config, to_yaml

    assert train.main(["--print-config", "train.steps=70", "run.name=x"]) == 0
    assert capsys.readouterr().out == to_yaml(load_config(None, ["train.steps=70", "run.name=x"]))


def test_a_shipped_config_by_name_from_any_folder(capsys, tmp_path, monkeypatch):
    from mmpretrain.config import load_config, to_yaml

    monkeypatch.chdir(tmp_path)  # no configs/ here
    expected = to_yaml(load_config(ROOT / "configs" / "text_image_audio.yaml", ["train.steps=700"]))
    for name in ("text_image_audio", "text_image_audio.yaml"):
        assert train.main([name, "train.steps=700", "--print-config"]) == 0
        assert capsys.readouterr().out == expected
    assert train.main(["text_image_audoi", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "text_image_audoi" in err and "text_image_audio, " in err, err


@pytest.mark.parametrize("progress", ["true", "false"])
def test_plain_log_line_per_log_every_without_a_bar(tiny_cfg, caplog, progress):
    """Progress bar off, or stdout not a terminal (as under pytest): one log line per
    train.log_every steps, with step, loss, lr, samples/s and ETA."""
    cfg = tiny_cfg("train.steps=4", "train.log_every=2", f"train.progress={progress}", "run.name=plain")
    with caplog.at_level("INFO", logger="mmpretrain"):
        train.run(cfg)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"], lines
    plain = r"step \d/4  loss \d+\.\d{4}  lr \d\.\d\de-\d\d  \d+ samples/s  ETA \d\d:\d\d"
    assert all(re.fullmatch(plain, line) for line in lines), lines


def test_rerunning_a_finished_run_appends_nothing(tiny_cfg):
    cfg = tiny_cfg("train.steps=2", "train.eval_every=1", "run.name=again")
    train.run(cfg)
    records = {name: (cfg.run_dir / name).read_text() for name in ("metrics.jsonl", "eval/history.jsonl")}
    assert [json.loads(l)["step"] for l in records["eval/history.jsonl"].splitlines()] == [1, 2]
    train.run(cfg)
    assert {name: (cfg.run_dir / name).read_text() for name in records} == records
    history = [json.loads(l) for l in records["eval/history.jsonl"].splitlines()]
    assert_in_tensorboard(history, cfg.run_dir / "tb" / "eval")  # step 2 evaluated again, shown once


def test_a_signal_writes_curves_with_integer_step_ticks(tiny_cfg, monkeypatch):
    import signal

    from mmpretrain.plots import curves_figure

    real = train.Trainer.train_step

    def then_signal(self, batches):
        values = real(self, batches)
        if self.step == 2:  # steps 1 and 2 done: SIGTERM arrives during the third
            self.signalled = signal.SIGTERM
        return values

    monkeypatch.setattr(train.Trainer, "train_step", then_signal)
    cfg = tiny_cfg("train.steps=10", "train.eval_every=2", "run.name=stopped")
    with pytest.raises(train.Preempted):
        train.run(cfg)
    assert (cfg.run_dir / "curves.png").is_file()
    fig = curves_figure(cfg.run_dir)
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(t == int(t) for t in ticks), (ax.get_title(), ticks)


def test_log_wandb_offline_logs_every_metric_and_eval_number(tiny_cfg, monkeypatch):
    """log.wandb=true with WANDB_MODE=offline (no network): a W&B run under the run folder, handed
    every number of metrics.jsonl (train/...) and of each evaluation (eval/<set>/...) at its step."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged, log = [], wandb.sdk.wandb_run.Run.log
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log",
                        lambda self, data, step=None, **kw: logged.append((step, data)) or log(self, data, step=step, **kw))
    cfg = tiny_cfg("train.steps=2", "log.wandb=true", "run.name=wb")
    train.run(cfg)
    (events,) = (cfg.run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    assert events.stat().st_size > 0
    metrics = read_metrics(cfg.run_dir)
    train_logs = [(step, d) for step, d in logged if any(k.startswith("train/") for k in d)]
    assert [step for step, _ in train_logs] == [m["step"] for m in metrics] == [1, 2]
    for (_, d), m in zip(train_logs, metrics):
        assert d["train/loss"] == m["loss"] and d["train/temperature/text-image"] == m["temperature"]["text-image"]
        assert d["train/memory/peak_rss_gib"] == m["memory"]["peak_rss_gib"]
    ((step, final),) = [(step, d) for step, d in logged if any(k.startswith("eval/") for k in d)]
    assert step == 2
    assert final["eval/retrieval/text->image/R@1"] == json.loads(
        (cfg.run_dir / "eval" / "retrieval.json").read_text())["text->image"]["R@1"]
    assert final["eval/image-shape/acc1"] == json.loads((cfg.run_dir / "eval" / "image-shape.json").read_text())["acc1"]
