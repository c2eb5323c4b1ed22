"""Data pipeline throughput on CPU: decoded samples/s on one worker, ours and open_clip's.

    python benchmarks/data_throughput.py [--batches 50]

On the built-in demo corpus's training shards (PNG 32 px + FLAC 1 s 16 kHz + caption; generated
into a temporary folder): ours (`BatchStream`, the training path: decode, augment, tokenize,
collate) for image+text and for audio+text, and, for image+text, open_clip's own webdataset
pipeline (the stages `open_clip_train.data.get_wds_dataset` builds, from its public functions:
shard and sample shuffles, decode, its train transform at the same size, its tokenizer, batching)
in the same run. Both read in the main process (num_workers=0), batch
128, after one warm-up batch. Needs pandas (open_clip_train imports it): pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch


def ours(urls, modality: str, batches: int, batch: int) -> float:
    from mmpretrain.config import load_config
    from mmpretrain.data import BatchStream
    from mmpretrain.tokenizer import Tokenizer

    cfg = load_config(None, [f"model.modalities=[{modality}]", "model.image.image_size=32",
                             "model.text.context_length=16", "data.num_workers=0"])
    it = iter(BatchStream(urls, cfg, Tokenizer(cfg.model.text), batch))
    next(it)
    start = time.perf_counter()
    n = sum(len(next(it)) for _ in range(batches))
    return n / (time.perf_counter() - start)


def open_clip_pipeline(pattern: str, samples: int, batches: int, batch: int) -> float:
    """open_clip's training pipeline, stage by stage as `get_wds_dataset` builds it, from its public
    functions. Not `get_wds_dataset` itself: its `tarfile_to_samples_nothrow` fails against the
    installed webdataset (KeyError 'fname' in group_by_keys_nothrow), so webdataset's own
    `tarfile_to_samples` with open_clip's `log_and_continue` handler stands in for that one stage."""
    import webdataset as wds
    from open_clip.tokenizer import SimpleTokenizer
    from open_clip.transform import image_transform
    from open_clip_train.data import (_SAMPLE_SHUFFLE_INITIAL, _SAMPLE_SHUFFLE_SIZE, _SHARD_SHUFFLE_INITIAL,
                                      _SHARD_SHUFFLE_SIZE, SharedEpoch, detshuffle2,
                                      filter_no_caption_or_no_image, log_and_continue)

    tokenizer, preprocess = SimpleTokenizer(context_length=16), image_transform(32, is_train=True)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(pattern),
        detshuffle2(bufsize=_SHARD_SHUFFLE_SIZE, initial=_SHARD_SHUFFLE_INITIAL, seed=0, epoch=SharedEpoch(0)),
        wds.split_by_node, wds.split_by_worker,
        wds.tarfile_to_samples(handler=log_and_continue),
        wds.shuffle(bufsize=_SAMPLE_SHUFFLE_SIZE, initial=_SAMPLE_SHUFFLE_INITIAL),
        wds.select(filter_no_caption_or_no_image),
        wds.decode("pilrgb", handler=log_and_continue),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=preprocess, text=lambda text: tokenizer(text)[0]),
        wds.to_tuple("image", "text"),
        wds.batched(batch, partial=False))
    loader = torch.utils.data.DataLoader(pipeline.repeat(), batch_size=None, num_workers=0)
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    n = sum(len(next(it)[0]) for _ in range(batches))
    return n / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=50)  # ~3 epochs: amortises the shuffle buffers
    p.add_argument("--batch", type=int, default=128)
    a = p.parse_args()
    torch.set_num_threads(1)
    from mmpretrain.data.demo import demo_corpus
    from mmpretrain.data.sources import expand

    pattern = demo_corpus(tempfile.mkdtemp(prefix="data_bench_"))["train"]
    urls = expand([pattern], "demo")
    samples = 16 * 140
    o_img = ours(urls, "image", a.batches, a.batch)
    o_aud = ours(urls, "audio", a.batches, a.batch)
    peer = open_clip_pipeline(pattern, samples, a.batches, a.batch)
    print(f"torch {torch.__version__}, one worker (main process), batch {a.batch}, {a.batches} batches")
    print(f"{'pipeline':<36}{'samples/s':>10}")
    print(f"{'ours image+text':<36}{o_img:>10.0f}")
    print(f"{'ours audio+text':<36}{o_aud:>10.0f}")
    print(f"{'open_clip pipeline image+text':<36}{peer:>10.0f}")
    print(f"ratio ours / open_clip (image+text): {o_img / peer:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
