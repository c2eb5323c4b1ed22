"""Training sources -> parsed samples -> `Batch`es, deterministic per (seed, epoch, rank, worker).

Each reader (a data-parallel rank's DataLoader worker) reads its part of every source's shards
(all of them, every parts-th sample, when there are fewer shards than readers), draws from the
sources in proportion to their weights (`data.sources` weights; an epoch ends when the first
source runs out, so the proportions hold), shuffles through a buffer, decodes and packs batches.
With `data.resampled`, shards are drawn with replacement and the stream never ends.

Resuming seeks, it does not replay: each batch carries its reader's position (raw samples
consumed once the batch was closed), the stream's state keeps the last delivered position of
every reader, and a resumed reader passes over that many raw samples of the tar stream without
decoding any, then goes on exactly as the interrupted run would have (the shuffle buffer is
refilled from the same samples in the same order, so the next batches are the same).

The data-parallel coordinates (which rank of how many reads) are arguments, and the agreement
that ends an epoch on every rank at once (`BatchStream(agree=...)`) is a function handed in:
nothing here knows about process groups.
"""

from __future__ import annotations

import collections
import itertools
import os
import random

import torch
import webdataset as wds

from mmpretrain.batch import collate
from mmpretrain.config import Config
from mmpretrain.data.samples import BadSample, SampleParser, SkipCounter
from mmpretrain.data.sources import Source, as_sources
from mmpretrain.packing import RowLayout


class _EpochDataset(torch.utils.data.IterableDataset):
    """One pass over the sources for one epoch (endless when resampled), yielding Batches
    (batched in the worker).

    The data are read by `readers` = (ranks, workers) logical readers, reader l reading part l of
    every source's shards: by default one per DataLoader worker of each rank, but a run resumed
    on another number of ranks keeps the layout of the run it resumes, each worker serving its
    share of the logical readers in turn. `start`: raw samples each logical reader passes over
    undecoded; `taken`: batches of this epoch already delivered (a resumed epoch goes on with the
    worker, and the reader, whose turn it was)."""

    def __init__(self, sources, cfg: Config, tokenizer, batch_size: int, epoch: int, train: bool,
                 rank: int = 0, world: int = 1, start: dict[int, int] | None = None, taken: int = 0,
                 readers: tuple[int, int] | None = None):
        self.sources, self.cfg, self.tokenizer = as_sources(sources), cfg, tokenizer
        self.batch_size, self.epoch, self.train = batch_size, epoch, train
        self.rank, self.world = rank, world
        self.start, self.taken, self.readers = start or {}, taken, readers

    def _read(self, source: Source, part: int, parts: int, skips) -> wds.DataPipeline:
        """This reader's raw samples of one source, tagged with its name."""
        seed, urls = self.cfg.run.seed, list(source.urls)
        read = [wds.tarfile_to_samples(handler=skips.bad_tar)]
        if self.train and self.cfg.objectives.distill.teacher == "offline":  # sidecars beside the shards
            from mmpretrain.data.teacher_embed import with_sidecars

            read = [with_sidecars(skips.bad_tar)]
        if source.keep is not None:  # a curated subset (data.sources[].keep): the others are not there
            read.append(wds.select(lambda raw: raw["__key__"] in source.keep))
        tag = wds.map(lambda raw: {**raw, "__source__": source.name})
        if self.train and self.cfg.data.resampled:  # shards with replacement, forever
            rng = random.Random(f"resample-{seed}-{source.name}-{part}")
            return wds.DataPipeline(lambda: ({"url": rng.choice(urls)} for _ in itertools.count()), *read, tag)
        if self.train:
            named = "" if len(self.sources) == 1 else f"-{source.name}"
            random.Random(f"shards-{seed}-{self.epoch}{named}").shuffle(urls)
        if len(urls) >= parts:  # each rank/worker reads its own shards
            return wds.DataPipeline(wds.SimpleShardList(urls[part::parts]), *read, tag)
        # fewer shards than readers: all read everything and keep every parts-th sample
        return wds.DataPipeline(wds.SimpleShardList(urls), *read,
                                lambda src: itertools.islice(src, part, None, parts), tag)

    def _mix(self, streams: list, name: str):
        """Draw from the sources by weight until the first runs out."""
        if len(streams) == 1:
            yield from streams[0]
            return
        rng = random.Random(f"mix-{self.cfg.run.seed}-{self.epoch}-{name}")
        iters, weights = [iter(s) for s in streams], [s.weight for s in self.sources]
        while (raw := next(iters[rng.choices(range(len(iters)), weights)[0]], None)) is not None:
            yield raw

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        ranks0, workers0 = self.readers or (self.world, workers)
        slot = (worker + self.taken) % workers  # the worker whose turn it was plays worker 0
        mine = [self._reader(part, ranks0 * workers0, workers0)
                for part in range(self.rank * workers + slot, ranks0 * workers0, self.world * workers)]
        if not mine:
            return
        served = self.taken // workers + (slot < self.taken % workers)  # batches this worker gave
        i = served % len(mine)
        while mine:  # the worker's readers in turn, each until it runs out
            i %= len(mine)
            batch = next(mine[i], None)
            if batch is None:
                del mine[i]
                continue
            yield batch
            i += 1

    def _reader(self, part: int, parts: int, workers0: int):
        """Logical reader `part` of `parts`: its batches of this epoch."""
        seed, data = self.cfg.run.seed, self.cfg.data
        name = f"{part // workers0}-{part % workers0}"  # (rank, worker) of the layout it was made for
        skips = SkipCounter(data.max_bad_sample_logs)
        parser = SampleParser(self.cfg, self.train, self.tokenizer)
        layout = RowLayout.from_config(self.cfg)
        raws = self._mix([self._read(s, part, parts, skips) for s in self.sources], name)
        if self.train and data.shuffle_buffer > 1:
            rng = random.Random(f"samples-{seed}-{self.epoch}-{name}")
            raws = wds.shuffle(data.shuffle_buffer, min(100, data.shuffle_buffer), rng=rng)(raws)
        budget = data.max_tokens if self.train else 0
        pending, used, pairs = [], 0, 0

        def close(position):
            batch = collate(pending, parser.media_shapes(), self.tokenizer.context_length)
            batch.skipped, batch.row_tokens, batch.row_budget = skips.take(), used, budget
            batch.sources = dict(collections.Counter(s["__source__"] for s in pending))
            batch.worker, batch.position = part, position
            return batch

        start, n = self.start.get(part, 0), -1
        for n, raw in enumerate(raws):
            if n < start:  # before the resume position: consumed by the interrupted run, not decoded
                continue
            key = raw.get("__key__", "?")
            try:
                sample = parser(raw, random.Random(f"{seed}-{self.epoch}-{key}"))
            except BadSample as e:
                skips(e.reason, e.detail, raw)
                continue
            sample["__source__"] = raw["__source__"]
            need = layout.sample_tokens(sample, pairs, parser.specs)
            if budget:  # close the row before the sample that would overflow it
                alone = layout.sample_tokens(sample, 0, parser.specs)  # as the first of a row
                if alone > budget:
                    skips("over_token_budget", f"{alone} tokens > data.max_tokens={budget}", raw)
                    continue
                if used + need > budget:
                    yield close(n)
                    pending, used, pairs, need = [], 0, 0, alone
            pending.append(sample)
            used, pairs = used + need, pairs + ("document" not in sample)
            if len(pending) == self.batch_size:
                yield close(n + 1)
                pending, used, pairs = [], 0, 0
        if pending and not self.train:  # eval keeps every sample; train keeps shapes fixed
            yield close(n + 1)
        elif skips.pending:  # skips after the last batch still count: an empty batch carries them
            pending, used, pairs = [], 0, 0
            yield close(n + 1)


def worker_count(cfg: Config) -> int:
    """`data.num_workers`, or for -1 (auto): with a GPU to feed, one worker per CPU this process
    has to itself (CPUs / local processes), less one for the training loop, at most 8; on a CPU
    machine 0 (decoding in the training process: workers would compete with it for the cores)."""
    if cfg.data.num_workers >= 0:
        return cfg.data.num_workers
    if not torch.cuda.is_available():
        return 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, (os.cpu_count() or 2) // local - 1))


def _loader(dataset, num_workers: int):
    # pinned batches when a GPU is there to receive them (Batch.pin_memory)
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                       persistent_workers=False, pin_memory=torch.cuda.is_available())


class BatchStream:
    """An endless, resumable iterator of training batches over repeated epochs, for data-parallel
    rank `rank` of `world`. `agree(ended)` -> whether any rank's epoch has ended (a collective;
    every rank calls it once per batch): then every rank starts the next epoch, so all ranks get
    the same number of batches per epoch, however uneven their shards."""

    def __init__(self, sources, cfg: Config, tokenizer, batch_size: int, rank: int = 0, world: int = 1,
                 agree=None):
        self.sources, self.cfg, self.tokenizer = as_sources(sources), cfg, tokenizer
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.agree = agree or (lambda ended: ended)
        self.epoch, self.batch_in_epoch = 0, 0  # DataLoader items taken this epoch (empty ones too)
        self.readers = self._own_readers()  # the logical readers' layout this epoch is read with
        self.positions: dict[int, int] = {}  # logical reader -> raw samples consumed
        self.skipped = collections.Counter()
        self.drawn = collections.Counter()  # samples delivered per source, whole run

    def _own_readers(self) -> tuple[int, int]:
        return self.world, max(1, worker_count(self.cfg))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "readers": list(self.readers),
                "positions": dict(self.positions), "rank": self.rank, "skipped": dict(self.skipped),
                "drawn": dict(self.drawn)}

    def load_state_dict(self, state: dict) -> None:
        """This rank's own state, written by a run with the same ranks."""
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.readers = tuple(state["readers"])
        self.positions = {int(k): v for k, v in state["positions"].items()}
        self.skipped = collections.Counter(state.get("skipped", {}))
        self.drawn = collections.Counter(state.get("drawn", {}))

    def reshard(self, states: list[dict]) -> None:
        """Resume from the states of every rank of a run with another number of ranks. The
        interrupted epoch goes on: its logical readers are shared out among this run's ranks and
        workers, each from its own position, so no sample is repeated and none is dropped beyond
        what an epoch drops anyway (each reader's last, partial batch). The order of the batches
        differs from the interrupted run's. Needs at least one logical reader per rank (ranks <=
        old ranks x old workers); otherwise the next epoch starts. Counts (skips, sources) are
        summed over the old ranks and carried by rank 0."""
        by_rank = {st.get("rank", i): st for i, st in enumerate(states)}  # sp peers hold copies
        first = by_rank[min(by_rank)]
        if self.world > first["readers"][0] * first["readers"][1]:
            return self._next_epoch_after(first, by_rank.values())
        self.epoch, self.batch_in_epoch, self.readers = first["epoch"], 0, tuple(first["readers"])
        self.positions = {int(k): v for st in by_rank.values() for k, v in st["positions"].items()}
        self._carry_counts(by_rank.values())

    def _next_epoch_after(self, state: dict, states) -> None:
        self.epoch, self.batch_in_epoch, self.readers, self.positions = state["epoch"] + 1, 0, self._own_readers(), {}
        self._carry_counts(states)

    def _carry_counts(self, states) -> None:
        self.skipped, self.drawn = collections.Counter(), collections.Counter()
        if self.rank == 0:
            for st in states:
                self.skipped.update(st.get("skipped", {}))
                self.drawn.update(st.get("drawn", {}))

    def _take(self, batches):
        """The next non-empty batch of this rank's epoch, or None at its end."""
        for batch in batches:
            self.batch_in_epoch += 1
            self.positions[batch.worker] = batch.position
            self.skipped.update(batch.skipped)  # each skip counted once, when it is reached
            if len(batch):  # (an empty one carries the epoch's trailing skips only)
                return batch
        return None

    def __iter__(self):
        workers = worker_count(self.cfg)
        while True:
            # an epoch resumed part-way (positions known, on every rank alike) may have less than a
            # batch left, none at its end: then the next epoch starts
            resumed = bool(self.positions)
            ds = _EpochDataset(self.sources, self.cfg, self.tokenizer, self.batch_size, self.epoch, True,
                               self.rank, self.world, self.positions, self.batch_in_epoch, self.readers)
            batches, delivered = iter(_loader(ds, workers)), 0
            while not self.agree((batch := self._take(batches)) is None):
                delivered += 1
                self.drawn.update(batch.sources)  # delivered (another rank's end drops a taken batch)
                yield batch
            del batches  # stops its workers
            if delivered == 0 and not resumed:  # agreed, so every rank raises: none waits for the others
                readers = self.world * max(1, workers)
                raise RuntimeError(f"an epoch over {sum(len(s.urls) for s in self.sources)} shard(s) gave some "
                                   f"rank no full batch of {self.batch_size}: too little (readable) data for "
                                   f"this batch size and {readers} reader(s)")
            self.epoch, self.batch_in_epoch, self.positions = self.epoch + 1, 0, {}
            self.readers = self._own_readers()


def eval_batches(urls: list[str], cfg: Config, tokenizer, batch_size: int = 256, rank: int = 0, world: int = 1):
    """One deterministic pass over eval shards (no shuffle, eval transforms, last batch kept): part
    `rank` of `world` (its own shards, or every world-th sample of fewer shards), all of it by default."""
    ds = _EpochDataset(urls, cfg, tokenizer, batch_size, epoch=0, train=False, rank=rank, world=world)
    return _loader(ds, worker_count(cfg))
