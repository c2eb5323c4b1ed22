"""Shard URLs -> parsed samples -> `Batch`es, deterministic per (seed, epoch, rank, worker).

The stream is a pure function of (shard list, seed, epoch, rank, worker), so a
resumed run replays the same batches: `BatchStream.state_dict()` records the
epoch and how many batches of it were consumed, and `load_state_dict` skips
that many batches of the same epoch (they are re-read and decoded, which costs
time but needs no extra bookkeeping in the workers).

The data-parallel coordinates (which rank of how many reads) are arguments:
nothing here knows about process groups.
"""

from __future__ import annotations

import collections
import itertools
import random

import torch
import webdataset as wds

from mmpretrain.batch import collate
from mmpretrain.config import Config
from mmpretrain.data.samples import BadSample, SampleParser, SkipCounter
from mmpretrain.packing import RowLayout


class _EpochDataset(torch.utils.data.IterableDataset):
    """One pass over the shards for one epoch, yielding Batches (batched in the worker)."""

    def __init__(self, urls, cfg: Config, tokenizer, batch_size: int, epoch: int, train: bool,
                 rank: int = 0, world: int = 1):
        self.urls, self.cfg, self.tokenizer = urls, cfg, tokenizer
        self.batch_size, self.epoch, self.train = batch_size, epoch, train
        self.rank, self.world = rank, world

    def __iter__(self):
        seed, data = self.cfg.run.seed, self.cfg.data
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        part, parts = self.rank * workers + worker, self.world * workers
        skips = SkipCounter(data.max_bad_sample_logs)
        parser = SampleParser(self.cfg, self.train, self.tokenizer)
        layout = RowLayout.from_config(self.cfg)
        urls = list(self.urls)
        if self.train:
            random.Random(f"shards-{seed}-{self.epoch}").shuffle(urls)
        read = wds.tarfile_to_samples(handler=lambda e: skips("bad_tar", repr(e)))
        if len(urls) >= parts:  # each rank/worker reads its own shards
            stages = [wds.SimpleShardList(urls[part::parts]), read]
        else:  # fewer shards than readers: all read everything and keep every parts-th sample
            stages = [wds.SimpleShardList(urls), read, lambda src: itertools.islice(src, part, None, parts)]
        if self.train and data.shuffle_buffer > 1:
            rng = random.Random(f"samples-{seed}-{self.epoch}-{self.rank}-{worker}")
            stages.append(wds.shuffle(data.shuffle_buffer, min(100, data.shuffle_buffer), rng=rng))
        budget = data.max_tokens if self.train else 0
        pending, used, pairs = [], 0, 0

        def close():
            batch = collate(pending, parser.media_shapes(), self.tokenizer.context_length)
            batch.skipped, batch.row_tokens, batch.row_budget = skips.take(), used, budget
            return batch

        for raw in wds.DataPipeline(*stages):
            key = raw.get("__key__", "?")
            try:
                sample = parser(raw, random.Random(f"{seed}-{self.epoch}-{key}"))
            except BadSample as e:
                skips(e.reason, f"{key}: {e}")
                continue
            need = layout.sample_tokens(sample, pairs, parser.specs)
            if budget:  # close the row before the sample that would overflow it
                alone = layout.sample_tokens(sample, 0, parser.specs)  # as the first of a row
                if alone > budget:
                    skips("over_token_budget", f"{key}: {alone} tokens > data.max_tokens={budget}")
                    continue
                if used + need > budget:
                    yield close()
                    pending, used, pairs, need = [], 0, 0, alone
            pending.append(sample)
            used, pairs = used + need, pairs + ("document" not in sample)
            if len(pending) == self.batch_size:
                yield close()
                pending, used, pairs = [], 0, 0
        if pending and not self.train:  # eval keeps every sample; train keeps shapes fixed
            yield close()
        elif skips.pending:  # skips after the last batch still count: an empty batch carries them
            pending, used, pairs = [], 0, 0
            yield close()


def _loader(dataset, num_workers: int):
    # pinned batches when a GPU is there to receive them (Batch.pin_memory)
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                       persistent_workers=False, pin_memory=torch.cuda.is_available())


class BatchStream:
    """An endless, resumable iterator of training batches over repeated epochs, for data-parallel
    rank `rank` of `world`."""

    def __init__(self, urls: list[str], cfg: Config, tokenizer, batch_size: int, rank: int = 0,
                 world: int = 1):
        self.urls, self.cfg, self.tokenizer, self.batch_size = urls, cfg, tokenizer, batch_size
        self.rank, self.world = rank, world
        self.epoch, self.batch_in_epoch = 0, 0
        self.skipped = collections.Counter()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.skipped = collections.Counter(state.get("skipped", {}))

    def reshard(self, state: dict, writers: int) -> None:
        """Resume from a checkpoint written by another number of ranks (`state`: its rank 0's or
        this rank's): the interrupted epoch is left and the next one starts, laid out for this
        number of ranks. Samples of the interrupted epoch that no rank had reached are not seen
        in that epoch."""
        self.epoch, self.batch_in_epoch = state["epoch"] + 1, 0
        self.skipped = collections.Counter(state.get("skipped", {}))

    def __iter__(self):
        while True:
            ds = _EpochDataset(self.urls, self.cfg, self.tokenizer, self.batch_size, self.epoch, True,
                               self.rank, self.world)
            produced = 0
            for i, batch in enumerate(_loader(ds, self.cfg.data.num_workers)):
                if i < self.batch_in_epoch:  # replaying a resumed epoch: its skips are in the state
                    produced += 1
                    continue
                self.skipped.update(batch.skipped)  # each skip counted once, when it is reached
                if not len(batch):  # the epoch's trailing skips only
                    continue
                produced += 1
                self.batch_in_epoch = i + 1
                yield batch
            if produced == 0:
                raise RuntimeError(f"an epoch over {len(self.urls)} shard(s) produced no full batch of "
                                   f"{self.batch_size}: too little (readable) data for this batch size")
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0


def eval_batches(urls: list[str], cfg: Config, tokenizer, batch_size: int = 256):
    """One deterministic pass over eval shards (no shuffle, eval transforms, last batch kept; every
    rank reads all of it)."""
    ds = _EpochDataset(urls, cfg, tokenizer, batch_size, epoch=0, train=False)
    return _loader(ds, cfg.data.num_workers)
