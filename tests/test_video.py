"""Video: the frame sampler's index math, decoding only the span needed, bad videos, the WebVid
and audio-track layouts, and encode_video downstream."""

import io
import json
import random

import av
import numpy as np
import pytest
import torch
import webdataset as wds

from mmpretrain.config import load_config
from mmpretrain.data import BatchStream, eval_batches, resolve_sources
from mmpretrain.data.demo_video import encode_mp4
from mmpretrain.encoders import BadSample
from mmpretrain.encoders.video import _open, decode, read_frames, sample_times
from mmpretrain.tokenizer import Tokenizer

from conftest import ROOT, flac_bytes


def video_cfg(*overrides):
    given = {o.split("=", 1)[0] for o in overrides}  # a test's own value replaces a default here
    defaults = ["model.modalities=[video]", "model.video.num_frames=4", "model.video.tubelet=2"]
    return load_config(None, [d for d in defaults if d.split("=", 1)[0] not in given] + list(overrides)).model.video


def numbered_frames(n, size=32) -> list[np.ndarray]:
    """Frame i is a flat grey of level 8 * i, so a decoded frame tells its index."""
    return [np.full((size, size, 3), min(255, 8 * i), np.uint8) for i in range(n)]


def mp4(n_frames=16, fps=8, size=32, wave=None, gop=None) -> bytes:
    """An H.264 clip of numbered frames (at 8 fps by default)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        s.options = {"crf": "0", "preset": "ultrafast", "g": str(gop or fps)}
        for f in numbered_frames(n_frames, size):
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    if wave is not None:
        return encode_mp4(numbered_frames(n_frames, size), wave)
    return buf.getvalue()


def frame_index(x: torch.Tensor) -> int:
    """The index of a numbered frame after normalisation (mean 0.5, std 0.5)."""
    return round((float(x.mean()) * 0.5 + 0.5) * 255 / 8)


# ------------------------------------------------------------------------- sampler


def test_segments_eval_takes_the_middle_of_each_segment():
    assert sample_times(2.0, video_cfg(), None) == [0.25, 0.75, 1.25, 1.75]
    assert sample_times(2.0, video_cfg("model.video.span_seconds=1.0"), None) == [0.625, 0.875, 1.125, 1.375]


def test_segments_train_draws_one_time_inside_each_segment():
    for seed in range(20):
        times = sample_times(2.0, video_cfg(), random.Random(seed))
        assert all(0.5 * i <= t < 0.5 * (i + 1) for i, t in enumerate(times))
    assert sample_times(2.0, video_cfg(), random.Random(3)) == sample_times(2.0, video_cfg(), random.Random(3))


def test_fps_mode_steps_at_the_rate_from_a_centred_or_random_start():
    cfg = video_cfg("model.video.mode=fps", "model.video.fps=2")
    assert sample_times(4.0, cfg, None) == [1.25, 1.75, 2.25, 2.75]  # 1.5 s of frames, centred
    start = sample_times(4.0, cfg, random.Random(0))
    assert 0 <= start[0] <= 2.5 and np.allclose(np.diff(start), 0.5)
    assert sample_times(1.0, cfg, None) == [0.0, 0.5, 1.0, 1.5]  # shorter than needed: from the start


def test_short_clips_repeat_their_last_frame():
    cfg = video_cfg("model.video.mode=fps", "model.video.fps=4", "model.video.num_frames=8")
    frames = decode(mp4(n_frames=6, fps=8), cfg, None)  # 0.75 s of video, 2 s of frames asked for
    assert [frame_index(f) for f in frames] == [0, 2, 4, 5, 5, 5, 5, 5]


def test_the_frame_shown_at_t_is_the_last_one_not_after_t():
    frames = decode(mp4(n_frames=16, fps=8), video_cfg(), None)  # eval: 0.25, 0.75, 1.25, 1.75 s
    assert [frame_index(f) for f in frames] == [2, 6, 10, 14]


def test_decodes_only_the_span_it_needs():
    """A 1 s span out of a 20 s clip: seek to the keyframe before it, stop after it."""
    data = mp4(n_frames=160, fps=8, gop=8)
    cfg = video_cfg("model.video.span_seconds=1.0")
    with _open(data) as c:
        stream = c.streams.video[0]
        frames, decoded = read_frames(c, stream, sample_times(20.0, cfg, None))
        assert [round(f.time * 8) for f in frames] == [77, 79, 81, 83]
        assert decoded <= 16  # one GOP before the span and the span itself, not 160
    with _open(data) as c:
        _, everything = read_frames(c, c.streams.video[0], [19.9])
        assert everything <= 16


# ------------------------------------------------------------------------- bad videos


def audio_only_mp4() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        a = c.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        c.mux(a.encode(frame))
        c.mux(a.encode())
    return buf.getvalue()


@pytest.mark.parametrize("make,overrides,reason", [
    (lambda: mp4()[: len(mp4()) // 3], [], "bad_video"),  # truncated
    (lambda: b"\x00\x00\x00\x18ftypmp42" + bytes(200), [], "bad_video"),  # corrupt
    (lambda: b"not a video at all", [], "bad_video"),
    (audio_only_mp4, [], "audio_only"),
    (lambda: mp4(size=64), ["model.video.max_pixels=1000"], "video_too_large"),
    (lambda: mp4(n_frames=80), ["model.video.max_seconds=5"], "video_too_long"),
])
def test_bad_video_is_a_counted_reason(make, overrides, reason):
    with pytest.raises(BadSample) as e:
        decode(make(), video_cfg(*overrides), None)
    assert e.value.reason == reason


def test_no_decodable_frames(monkeypatch):
    from mmpretrain.encoders import video

    monkeypatch.setattr(video, "read_frames", lambda container, stream, times: ([], 0))
    with pytest.raises(BadSample) as e:
        decode(mp4(), video_cfg(), None)
    assert e.value.reason == "no_frames"


# ------------------------------------------------------------------------- layouts


def write(folder, samples) -> str:
    with wds.ShardWriter(str(folder / "v-%06d.tar"), maxcount=100, verbose=0) as sink:
        for s in samples:
            sink.write(s)
    return str(folder / "v-000000.tar")


def test_webvid_and_audio_track_layouts(tiny_cfg, tmp_path):
    wave = np.sin(np.arange(16000) / 5).astype(np.float32) * 0.5
    samples = [{"__key__": "webvid-txt", "mp4": mp4(), "txt": "a clip with a txt caption"},
               {"__key__": "webvid-json", "mp4": mp4(), "json": json.dumps({"caption": "a json caption",
                                                                            "duration": 2})},
               {"__key__": "track", "mp4": mp4(wave=wave), "txt": "a clip with its own sound"},
               {"__key__": "both", "mp4": mp4(wave=wave), "flac": flac_bytes(), "txt": "a separate flac wins"}]
    cfg = tiny_cfg("model.modalities=[audio, video]", "data.video_audio=true", "model.video.num_frames=4",
                   "model.video.width=32", "model.video.heads=2", "model.video.depth=1")
    cfg.data.eval_sources = [write(tmp_path, samples)]
    (batch,) = list(eval_batches(resolve_sources(cfg.data, "eval"), cfg, Tokenizer(cfg.model.text)))
    assert batch.keys == ["webvid-txt", "webvid-json", "track", "both"] and not batch.skipped
    assert batch.captions[1] == ["a json caption"]
    assert batch.present["video"].all()
    assert batch.present["audio"].tolist() == [False, False, True, True]  # no track: simply absent
    track = batch.media["audio"][2]
    assert track.abs().max() > 0.3 and not torch.equal(track, batch.media["audio"][3])
    cfg.data.video_audio = False
    (batch,) = list(eval_batches(resolve_sources(cfg.data, "eval"), cfg, Tokenizer(cfg.model.text)))
    assert batch.present["audio"].tolist() == [False, False, False, True]


def test_demo_video_stream_trains_and_is_deterministic(tiny_cfg):
    cfg = tiny_cfg("data.sources=[demo-video]", "data.eval_sources=[demo-video]", "model.modalities=[video]",
                   "model.video.num_frames=4", "model.video.width=32", "model.video.heads=2")
    urls, tok = resolve_sources(cfg.data, "train"), Tokenizer(cfg.model.text)
    first = next(iter(BatchStream(urls, cfg, tok, 8)))
    again = next(iter(BatchStream(urls, cfg, tok, 8)))
    assert torch.equal(first.media["video"], again.media["video"]) and first.media["video"].shape == (8, 4, 3, 32, 32)
    assert all(" moving " in c[0] for c in first.captions)


def test_encode_video_from_files_and_frames_equals_the_pipeline(tiny_cfg, tmp_path):
    import mmpretrain
    from mmpretrain import train

    cfg = tiny_cfg("data.sources=[demo-video]", "data.eval_sources=[demo-video]", "model.modalities=[video]",
                   "model.video.num_frames=4", "model.video.width=32", "model.video.heads=2",
                   "train.steps=1", "run.name=video")
    train.run(cfg)
    model = mmpretrain.load_pretrained(cfg.run_dir / "export")
    data = mp4(n_frames=16)
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    pipeline = decode(data, cfg.model.video, None)[None]  # what evaluation feeds the model
    from_file = model.encode_video([str(path)])
    torch.testing.assert_close(from_file, model.encode_video(pipeline))
    with av.open(io.BytesIO(data)) as c:  # the frames evaluation picks, as uint8 (T, 3, H, W)
        frames = torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")).permute(2, 0, 1)
                              for f in c.decode(video=0)])[[2, 6, 10, 14]]
    torch.testing.assert_close(model.encode_video(frames[None]), from_file)
    tower = mmpretrain.load_encoder(cfg.run_dir / "export" / "video")
    with torch.no_grad():
        torch.testing.assert_close(tower(tower.preprocess([data]))[1], from_file)


def test_init_from_image_copies_the_image_tower():
    from mmpretrain.model import MultimodalModel

    cfg = load_config(ROOT / "configs" / "text_image_audio_video.yaml", [
        "model.video.init_from_image=true", "model.video.patch_size=4"])
    model = MultimodalModel(cfg.model, 100)
    video, image = model.towers["video"].encoder, model.towers["image"].encoder.vit
    assert torch.equal(video.blocks[0].attn.qkv.weight, image.blocks[0].attn.qkv.weight)
    assert torch.equal(video.patch_embed.weight.sum(2), image.patch_embed.proj.weight)
    assert not video.temporal_embed.any()
    assert cfg.model.image.pre_norm and video.patch_embed.bias is None  # CLIP's ln_pre, on both
    with torch.no_grad():
        image.norm_pre.weight.normal_()
        video.init_from_image(image)
    assert torch.equal(video.norm_pre.weight, image.norm_pre.weight)


def test_variable_frame_rate_uses_timestamps_not_frame_counts():
    from fractions import Fraction

    times = [0.0, 0.1, 0.15, 0.9, 1.0, 1.6, 1.7, 1.95]  # frame i is shown from times[i]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        s = c.add_stream("libx264", rate=25)
        s.width = s.height = 32
        s.pix_fmt, s.time_base, s.codec_context.time_base = "yuv420p", Fraction(1, 1000), Fraction(1, 1000)
        s.options = {"crf": "0", "preset": "ultrafast", "bf": "0"}
        for f, t in zip(numbered_frames(len(times)), times):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts, frame.time_base = int(t * 1000), Fraction(1, 1000)
            c.mux(s.encode(frame))
        c.mux(s.encode())
    frames = decode(buf.getvalue(), video_cfg(), None)  # eval times 0.249, 0.746, 1.244, 1.741 s
    assert [frame_index(f) for f in frames] == [2, 2, 4, 6]


def _decode_in_child(data, queue):
    queue.put(tuple(decode(data, video_cfg(), None).shape))


def test_a_forked_worker_decodes_after_its_parent_did():
    """A DataLoader worker is a fork of the trainer, which decoded clips for an evaluation first:
    the worker must not inherit its parent's swscale context, whose slice threads a fork leaves
    behind (the video demo hung at its second epoch's first batch)."""
    import multiprocessing as mp

    data = mp4()
    shape = tuple(decode(data, video_cfg(), None).shape)  # the parent's reformatter, set up
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_decode_in_child, args=(data, queue), daemon=True)
    child.start()
    child.join(timeout=60)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung, "the forked worker hung decoding"
    assert queue.get(timeout=5) == shape
