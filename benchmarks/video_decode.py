"""Video decoding: clips/s for `num_frames` frames per clip, ours against decode-everything.

    python benchmarks/video_decode.py [--frames 8] [--seconds 30]

Ours (`encoders.video.decode`): stream metadata first, the sampler's timestamps,
a seek to the keyframe before the first, decoding stops after the last. The peer
is what common loaders do: decode every frame of the clip with PyAV, then index
the sampled ones (same sampler, same preprocessing). Two workloads, measured in
the same run on one worker (one process, torch and PyAV on one thread):
(a) the demo corpus's clips (2 s, 32 x 32), (b) a generated 30 s 1280 x 720 H.264
clip (made once into a temporary folder), 8 frames from a 2 s span
(`span_seconds=2`) and from the whole clip.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

from mmpretrain.config import load_config
from mmpretrain.encoders.video import decode, preprocess_frames, sample_times


def decode_everything(data: bytes, cfg, rng) -> torch.Tensor:
    """The peer: all frames decoded, then the sampled ones picked by index."""
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
        rate = float(stream.average_rate)
    times = sample_times(len(frames) / rate, cfg, rng)
    idx = [min(len(frames) - 1, int(t * rate + 1e-6)) for t in times]
    x = torch.from_numpy(np.stack([frames[i] for i in idx])).permute(0, 3, 1, 2)
    return preprocess_frames(x, cfg, rng)


def long_clip(seconds: int, folder: Path) -> bytes:
    path = folder / f"clip_{seconds}s_720p.mp4"
    if not path.exists():
        with av.open(str(path), mode="w") as c:
            s = c.add_stream("libx264", rate=30)
            s.width, s.height, s.pix_fmt = 1280, 720, "yuv420p"
            s.options = {"preset": "ultrafast", "g": "60", "crf": "28"}
            yy, xx = np.mgrid[0:720, 0:1280]
            for i in range(seconds * 30):  # a moving gradient with a square: real motion for the codec
                img = np.stack([(xx + 4 * i) % 256, (yy + 2 * i) % 256, np.full_like(xx, (3 * i) % 256)], -1)
                img[300:420, (40 + 8 * i) % 1100:(40 + 8 * i) % 1100 + 120] = 255
                c.mux(s.encode(av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")))
            c.mux(s.encode())
    return path.read_bytes()


def rate(fn, clips, cfg, min_seconds=3.0) -> float:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        fn(clips[n % len(clips)], cfg, random.Random(n))
        n += 1
    return n / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--seconds", type=int, default=30)
    p.add_argument("--cache", default=None, help="demo corpus cache (default: a temporary folder)")
    a = p.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="video_bench_"))
    from mmpretrain.data.demo_video import demo_video_corpus
    import webdataset as wds

    pattern = demo_video_corpus(a.cache or str(tmp), variants_per_concept=1)["eval"]
    demo = [s["mp4"] for s in wds.WebDataset(pattern, shardshuffle=False)][:50]
    big = [long_clip(a.seconds, tmp)]
    base = [f"model.video.num_frames={a.frames}", "model.video.tubelet=1", "model.modalities=[video]"]
    cases = [("demo clips (2 s, 32x32)", demo, load_config(None, base)),
             (f"{a.seconds} s 720p, 2 s span", big, load_config(None, base + ["model.video.span_seconds=2",
                                                                              "model.video.frame_size=224"])),
             (f"{a.seconds} s 720p, whole clip", big, load_config(None, base + ["model.video.frame_size=224"]))]
    print(f"torch {torch.__version__}, PyAV {av.__version__}, one worker; {a.frames} frames per clip")
    print(f"{'workload':<28}{'ours clips/s':>14}{'decode-all clips/s':>20}{'ratio':>8}")
    for name, clips, cfg in cases:
        ours, peer = rate(decode, clips, cfg.model.video), rate(decode_everything, clips, cfg.model.video)
        print(f"{name:<28}{ours:>14.1f}{peer:>20.2f}{ours / peer:>8.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
