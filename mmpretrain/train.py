"""Pretraining entry point.

    python -m mmpretrain.train configs/text_image_audio.yaml [key.path=value ...] [--print-config]
    mmpretrain-train text_image_audio train.steps=800       # a shipped config by name, from any folder
    python -m mmpretrain.train --print-config train.steps=100  # no config file: the built-in defaults
    torchrun --nproc_per_node N -m mmpretrain.train configs/text_image_audio.yaml

Reads like the data flow: config -> data -> model -> parallelize -> loop ->
eval -> export. Everything a run writes goes under runs/<run.name>/.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import math
import random
import resource
import signal
import sys
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)

from mmpretrain import checkpoint, parallel
from mmpretrain.attention import resolve_backend
from mmpretrain.batch import coverage
from mmpretrain.build import NonFiniteLoss, build, train_step
from mmpretrain.config import Config, ConfigError, TrainConfig, load_config, to_dict, to_yaml
from mmpretrain.data import BatchStream
from mmpretrain.data.sources import check_data, train_sources
from mmpretrain.eval.classify import plot_confusion
from mmpretrain.eval.retrieval import format_table, probe_eval
from mmpretrain.eval.sets import Evaluator, format_classification, headline, run_sets
from mmpretrain.export import export_model
from mmpretrain.model import check_memory
from mmpretrain.parallel.fsdp import gathered
from mmpretrain.plots import plot_curves, plot_reconstructions
from mmpretrain.runlog import RunLog, source_tags
from mmpretrain.tokenizer import Tokenizer

log = logging.getLogger("mmpretrain")
COVERAGE_STEPS = 20  # a session's first steps, whose batches show which towers and pairs get data


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' was requested but no CUDA device is available")
    return torch.device(name)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Preempted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint of the last finished step was written."""


class Trainer:
    def __init__(self, cfg: Config, env: parallel.DistEnv, device: torch.device):
        self.cfg, self.env, self.device = cfg, env, device
        self.run_dir = cfg.run_dir
        self.tokenizer = Tokenizer(cfg.model.text)
        check_memory(cfg, self.tokenizer.vocab_size, device, env.world_size)  # before anything is allocated
        self.resume_from, self.init_from = resume_path(cfg), init_path(cfg)
        self.train_sources = train_sources(cfg.data)
        self.eval_sets = run_sets(cfg)  # [0]: the retrieval on data.eval_sources
        self.eval_urls = self.eval_sets[0].urls
        check_data(cfg, self.train_sources, self.eval_urls, env.dp_size, env.is_main)  # before the model
        probe_eval(self.eval_urls, cfg, self.tokenizer)  # before step 1, not after the last
        try:
            resolve_backend(cfg.model.attention.backend, device.type)
        except RuntimeError as e:
            raise ConfigError(f"model.attention.backend: {e}") from None
        self.stream = BatchStream(self.train_sources, cfg, self.tokenizer, cfg.train.batch_size,
                                  env.dp_rank, env.dp_size, agree=self._any_rank if env.world_size > 1 else None)
        built = build(cfg, env, device, self.tokenizer)
        self.task, self.wrapped = built.task, built.wrapped  # wrapped: what computes the loss (DDP, FSDP2)
        self.optimizer, self.scheduler, self.autocast = built.optimizer, built.scheduler, built.autocast
        self.bf16 = built.bf16
        self.evaluator = Evaluator(self.task.model, cfg, self.tokenizer, device, env.dp_rank, env.dp_size,
                                   lambda obj: parallel.gather_objects(obj, env.group("dp")))
        wandb = {"project": cfg.log.wandb_project, "config": to_dict(cfg)} if cfg.log.wandb else None
        self.log = RunLog(self.run_dir, env.is_main, wandb, source_tags(cfg.data.sources))
        self.skips_logged: collections.Counter = collections.Counter()  # skips already in metrics.jsonl
        self.data_wait = 0.0  # seconds spent waiting for batches since the last record
        self.step = 0
        self.signalled: int | None = None
        self.flops_per_token: float | None = None  # counted on the run's first step (`_counted_step`)
        self.coverage: collections.Counter | None = collections.Counter()  # see `_say_what_saw_no_data`
        self.saver: checkpoint.AsyncCheckpointer | None = None  # made at the first background save

    # ------------------------------------------------------------------ state
    def local_state(self) -> dict:
        """This rank's own part of a checkpoint (the tensors go through DCP)."""
        return {"scheduler": self.scheduler.state_dict(), "step": self.step, "data": self.stream.state_dict(),
                "sources": [to_dict(s) for s in self.cfg.data.sources], "rng": rng_state(),
                "steps": self.cfg.train.steps, "flops_per_token": self.flops_per_token}

    def maybe_resume(self) -> None:
        """Load the checkpoint `train.resume` names, if any, or the weights `train.init_from` names,
        each checked against this config (model, data.sources) before run() writes anything; records
        past its step are dropped (all of them when there is none), so metrics.jsonl holds each step
        once."""
        if self.resume_from is not None:
            checkpoint.check_compatible(self.task, self.resume_from)
            state = checkpoint.load_checkpoint(self.resume_from, self.task, self.optimizer)
            self.scheduler.load_state_dict(state["scheduler"])
            same_ranks = state["writers"] == self.env.world_size
            if same_ranks:
                set_rng_state(state["rng"])
                # counted anew, the FLOPs would be counted on this session's first step, whose
                # kernels under FlopCounterMode round differently: the resume would not be exact
                self.flops_per_token = state.get("flops_per_token")
            self._follow_schedule(state.get("steps"), state["step"])
            if not self.keeps_data(state["sources"]):
                log.warning("train.resume_data=reset: the data start afresh (epoch 0 of data.sources); "
                            "weights, optimizer and step are the checkpoint's")
            elif same_ranks:
                self.stream.load_state_dict(state["data"])
            else:  # see BatchStream.reshard for the rule
                self.stream.reshard([st["data"] for st in state.get("all", [state])])
            self.step = state["step"]
            self.skips_logged = collections.Counter(self.stream.skipped)
            log.info("resumed from %s (step %d, written by %d process(es))", self.resume_from, self.step,
                     state["writers"])
            if self.step >= self.cfg.train.steps:
                log.warning("the checkpoint is at step %d, at or past train.steps=%d: nothing to train; "
                            "evaluating and exporting it (raise train.steps to train on)",
                            self.step, self.cfg.train.steps)
        elif self.init_from is not None:
            # fresh optimizer, schedule, data position and step
            log.info("%s", checkpoint.load_weights(self.task, self.init_from, self.env.rank, self.env.world_size))
        self.log.trim(self.step)

    def _follow_schedule(self, theirs: int | None, step: int) -> None:
        """A resume with another train.steps than the checkpoint's run (`theirs`, None in older
        checkpoints) goes on along this run's schedule (warm-up and decay over train.steps) from
        `step` on, and says so."""
        if theirs == self.cfg.train.steps:
            return
        before = self.scheduler.get_last_lr()[0]
        self.scheduler.last_epoch -= 1
        self.scheduler.step()  # the learning rates of this run's schedule at the checkpoint's step
        if theirs is not None:
            log.warning("train.steps=%d, the checkpoint's run had %d: the learning-rate schedule (warm-up and "
                        "decay) is this run's from step %d on: lr %.3g there, %.3g in the checkpoint's",
                        self.cfg.train.steps, theirs, step, self.scheduler.get_last_lr()[0], before)

    def keeps_data(self, theirs: list[dict]) -> bool:
        """Whether the checkpoint's data position goes on: it was written for these data.sources
        (`theirs`: the checkpoint's). Other sources are refused, or with train.resume_data=reset
        start afresh."""
        ours = [to_dict(s) for s in self.cfg.data.sources]
        if self.cfg.train.resume_data == "reset":
            return theirs == ours
        if theirs != ours:
            raise ConfigError(f"train.resume: the checkpoint's data position is in data.sources {_listed(theirs)}, "
                              f"this config reads {_listed(ours)}; train.resume_data=reset starts the data afresh "
                              f"(keeping weights, optimizer and step), or point run.name elsewhere")
        return True

    def save(self, background: bool = False) -> None:
        """Collective: every rank writes its shards and its own state. `background` (with
        train.async_checkpoint): return once the state is staged; the checkpoint completes at the
        next save."""
        args = (self.run_dir, self.step, self.task, self.optimizer, self.local_state(), self.cfg.train.keep_checkpoints)
        if background and self.cfg.train.async_checkpoint:
            self.saver = self.saver or checkpoint.AsyncCheckpointer()
            return self.saver.save(*args)
        if self.saver is not None:
            self.saver.wait()
        checkpoint.save_checkpoint(*args)

    def full_state(self) -> dict[str, torch.Tensor]:
        """Collective: the task's full tensors (model.*, objectives.*) on the main rank (gathered
        from the shards)."""
        return get_model_state_dict(self.task, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    # ------------------------------------------------------------------ steps
    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step (`build.train_step`) -> logged values."""
        return train_step(self.task, self.wrapped, self.optimizer, self.scheduler, self.autocast,
                          self._on_device(batches), self.cfg.train, self.step)

    def _counted_step(self, batches) -> tuple[dict[str, float], float | None]:
        """`train_step` under torch's FlopCounterMode -> (its values, this rank's FLOPs per token of
        the whole step, all ranks' tokens). Later steps are taken to cost the same per token (their
        rows and media vary little within a run). Counted: forward and backward matmuls,
        convolutions and the attention kernels torch has formulas for, and the forward that
        activation checkpointing recomputes (so with it on, `mfu` is hardware FLOPs utilisation)."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            values = self.train_step(batches)
        replicas = self.cfg.train.grad_accum * self.env.dp_size
        tokens = values.get("tokens", 0.0) * replicas
        return values, (counter.get_total_flops() / tokens if tokens else None)

    def _model_flops(self, flops_per_s: float) -> dict[str, float]:
        """This device's model TFLOP/s, and `mfu` (their share of the device's peak) where the peak
        is known: log.peak_tflops, or a known CUDA device at bf16."""
        values = {"model_tflops_per_s": flops_per_s / 1e12}
        peak = self.cfg.log.peak_tflops or (_cuda_bf16_peak(self.device) if self.bf16 else 0.0)
        if peak:
            values["mfu"] = flops_per_s / 1e12 / peak
        return values

    def _on_device(self, batches):
        """`batches` moved to the device, the time spent waiting for each added to `data_wait`."""
        while True:
            waited = time.perf_counter()
            batch = next(batches)
            if self.coverage is not None:
                self.coverage.update(coverage(batch, list(self.task.objectives.logit_scale)))
            batch = batch.to(self.device, non_blocking=True)
            self.data_wait += time.perf_counter() - waited
            yield batch

    def evaluate(self, final: bool = False) -> dict[str, dict]:
        """The sets due at this step (every set when `final`), split across the ranks -> {name: result};
        the main rank records them: eval/<name>.json, eval/history.jsonl, TensorBoard."""
        sets = [s for s in self.eval_sets if final or s.due(self.step)]
        # autocast as in training: FSDP2's bf16 compute parameters need bf16 inputs
        with self.autocast, gathered(self.task):
            results = self.evaluator.evaluate(sets)
            if self.env.is_main and self.task.objectives.masked_modalities:
                self._reconstructions()
        self.log.eval(self.step, {s.name: headline(s.kind, results[s.name]) for s in sets})
        if self.env.is_main:
            for s in sets:
                out = self.run_dir / "eval" / f"{s.name}.json"
                out.write_text(json.dumps(results[s.name], indent=1))
                if final and s.kind != "retrieval":
                    r = results[s.name]
                    plot_confusion(r["confusion_matrix"], list(r["per_class_recall"]),
                                   f"{s.name} ({s.kind}): acc1 {r['acc1']:.3f}", out.with_suffix(".png"))
        return results

    def _reconstructions(self) -> None:
        """eval/reconstructions/step<N>.png: masked modelling's reconstructions of the first
        held-out samples (the main rank alone: inside `gathered`, forwards need no collective)."""
        from mmpretrain.data import eval_batches
        from mmpretrain.objectives.masked import examples

        batch = next(iter(eval_batches(self.eval_urls, self.cfg, self.tokenizer, batch_size=32)), None)
        shown = examples(self.task, batch.to(self.device)) if batch is not None else {}
        if shown:
            out = self.run_dir / "eval" / "reconstructions" / f"step{self.step:06d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            plot_reconstructions(shown, self.cfg.model, f"masked modelling, held-out samples, step {self.step}", out)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        """Train from `self.step` (0, or where `maybe_resume` put it) to train.steps, then evaluate."""
        cfg = self.cfg.train
        handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        bar = _progress(cfg, self.step, self.env.is_main)
        with contextlib.closing(self.log):  # after the final evaluation's record
            try:
                self._loop(bar)
            finally:
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)
                bar.close()
            self.save()
            total = parallel.sum_counts(self.stream.skipped, self.env.group("dp"))
            if total:
                log.warning("bad samples skipped (all ranks, whole run): %s", dict(total))
            return self.evaluate(final=True)

    def _any_rank(self, flag: bool) -> bool:
        return parallel.any_rank(torch.tensor(flag, device=self.device))

    def _on_signal(self, signum, frame) -> None:
        if self.signalled is not None:  # asked twice: stop now, without a checkpoint
            raise KeyboardInterrupt
        self.signalled = signum  # acted on at the next step boundary, on every rank at once

    def _loop(self, bar) -> None:
        cfg = self.cfg.train
        replicas = cfg.grad_accum * self.env.dp_size  # micro-batches per step
        batches = iter(self.stream)
        t_last, samples, tokens = time.perf_counter(), 0.0, 0.0
        t_start, first = t_last, self.step  # this session's pace, for the ETA
        while self.step < cfg.steps:
            if self.flops_per_token is None and self.step == first and self.cfg.parallel.compile != "on":
                values, self.flops_per_token = self._counted_step(batches)
            else:
                values = self.train_step(batches)
            self.step += 1
            bar.update(1)
            if self.coverage is not None and (self.step - first == COVERAGE_STEPS or self.step == cfg.steps):
                self._say_what_saw_no_data(self.step - first)
            samples += values.get("samples", 0.0) * replicas
            tokens += values.get("tokens", 0.0) * replicas
            if values and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                elapsed = time.perf_counter() - t_last
                record = {"step": self.step, **values, "lr": self.scheduler.get_last_lr()[0],
                          "samples_per_s": samples / elapsed, "tokens_per_s": tokens / elapsed,
                          "data_wait": self.data_wait / elapsed, "skipped_samples": self._new_skips()}
                if len(self.train_sources) > 1:
                    record["source_share"] = self._source_shares()
                record["temperature"], record["memory"] = self._temperatures(), self._memory()
                if self.task.objectives.logit_bias is not None:  # SigLIP's learned bias per pair
                    record["bias"] = {k: float(v) for k, v in _full(self.task.objectives.logit_bias).items()}
                if self.flops_per_token:
                    record.update(self._model_flops(self.flops_per_token * record["tokens_per_s"]))
                self.data_wait = 0.0
                t_last, samples, tokens = time.perf_counter(), 0.0, 0.0
                bar.set_postfix(loss=f"{values['loss']:.3f}", samples_s=f"{record['samples_per_s']:.0f}",
                                refresh=False)
                self.log.metrics(record)
                if bar.disable and self.env.is_main:  # no bar (off, or not a terminal): a plain line
                    pace = (time.perf_counter() - t_start) / (self.step - first)  # seconds per step
                    log.info("%s", _log_line(record, cfg.steps, pace))
            if self.step < cfg.steps and any(s.due(self.step) for s in self.eval_sets):
                line = f"step {self.step}: " + _eval_line(self.evaluate())  # (a collective)
                if self.env.is_main:
                    bar.write(line)
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                self.save(background=True)
            if self._any_rank(self.signalled is not None):
                self.save()
                if self.env.is_main:
                    plot_curves(self.run_dir)  # what the run got to, as at its end
                raise Preempted(f"stopped by a signal after step {self.step}; checkpoint written, "
                                f"run the same command again to resume")

    def _say_what_saw_no_data(self, steps: int) -> None:
        """Collective: warn, once, of the towers and contrastive pairs that no sample of this
        session's first `steps` steps reached (on any rank): they do not train, and what leaves
        them out of the model."""
        seen = parallel.sum_counts(self.coverage, self.env.group("dp"))
        self.coverage = None
        towers = [m for m in self.cfg.model.modalities if not seen[m]]
        pairs = [p for p in self.task.objectives.logit_scale if not seen[p] and not set(p.split("-")) & set(towers)]
        if not self.env.is_main:
            return
        if towers:
            kept = [m for m in self.cfg.model.modalities if m not in towers]
            log.warning("no sample of the first %d steps has %s: the %s tower(s) do not train "
                        "(model.modalities=[%s] leaves them out)", steps, " or ".join(towers), " and ".join(towers),
                        ", ".join(kept))
        if pairs:
            log.warning("no sample of the first %d steps has both sides of %s: the pair's temperature does "
                        "not train%s", steps, " or ".join(pairs), " (objectives.media_pairs=false leaves out "
                        "the media pairs)" if any("text" not in p.split("-") for p in pairs) else "")

    def _source_shares(self) -> dict[str, float]:
        """Realised proportions of the sources over the run so far, all data-parallel ranks."""
        drawn = parallel.sum_counts(self.stream.drawn, self.env.group("dp"))
        total = sum(drawn.values()) or 1
        return {s.name: drawn[s.name] / total for s in self.train_sources}

    def _new_skips(self) -> dict[str, int]:
        """Samples skipped on every data-parallel rank since the previous record (so the records
        sum to the run's total)."""
        new = self.stream.skipped - self.skips_logged
        self.skips_logged = collections.Counter(self.stream.skipped)
        return dict(parallel.sum_counts(new, self.env.group("dp")))

    @torch.no_grad()
    def _temperatures(self) -> dict[str, float]:
        """Each pair's contrastive temperature, 1 / exp(logit scale) (collective under FSDP2: the
        scales are sharded)."""
        return {pair: math.exp(-float(s)) for pair, s in _full(self.task.objectives.logit_scale).items()}

    def _memory(self) -> dict[str, float]:
        """This process's peak memory so far, GiB: CUDA allocated and reserved, or its resident set
        on CPU."""
        if self.device.type == "cuda":
            return {"cuda_peak_allocated_gib": torch.cuda.max_memory_allocated(self.device) / 2**30,
                    "cuda_peak_reserved_gib": torch.cuda.max_memory_reserved(self.device) / 2**30}
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return {"peak_rss_gib": rss / 2**30}  # ru_maxrss: bytes on macOS, KiB on Linux


def resume_path(cfg: Config) -> Path | None:
    """The checkpoint `train.resume` names: auto (the newest complete one, if any), none, or a folder."""
    resume = cfg.train.resume
    if resume == "none":
        return None
    if resume == "auto":
        return checkpoint.latest_checkpoint(cfg.run_dir)
    path = Path(resume)
    if not checkpoint.is_checkpoint(path):
        raise ConfigError(f"train.resume: {resume!r} is not a complete checkpoint folder (e.g. "
                          f"{cfg.run_dir}/checkpoints/step_00000100); expected auto, none or such a folder")
    return path


def init_path(cfg: Config) -> Path | None:
    """The weights `train.init_from` names: an export folder or a checkpoint folder."""
    if not cfg.train.init_from:
        return None
    path = Path(cfg.train.init_from)
    if not ((path / "model.safetensors").is_file() or checkpoint.is_checkpoint(path)):
        raise ConfigError(f"train.init_from: {cfg.train.init_from!r} is neither an export folder (model.safetensors) "
                          f"nor a complete checkpoint folder")
    return path


def _full(params) -> dict[str, torch.Tensor]:
    """A ParameterDict's values whole (a collective under FSDP2, where they are sharded)."""
    return {k: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for k, p in params.items()}


def _listed(sources: list[dict]) -> str:
    """data.sources in a line: "[a-{000..009}.tar, b.tar (weight 0.3, name b)]"."""
    def one(s):
        extra = [f"{k} {s[k]}" for k, default in (("weight", 1.0), ("name", "")) if s[k] != default]
        return s["pattern"] + (f" ({', '.join(extra)})" if extra else "")

    return "[" + ", ".join(one(s) for s in sources) + "]"


def _eval_line(results: dict[str, dict]) -> str:
    """"retrieval text->image R@1=0.52 ...  image-shape acc1=0.61": an evaluation in a line."""
    return "  ".join(f"{name} acc1={r['acc1']:.2f}" if "acc1" in r else
                     f"{name} " + " ".join(f"{k} R@1={v['R@1']:.2f}" for k, v in r.items())
                     for name, r in results.items())


def _progress(cfg: TrainConfig, initial: int, enabled: bool):
    """The progress bar, on a terminal only; without it `_loop` logs `_log_line`s (cluster logs)."""
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                file=sys.stdout, disable=not (enabled and cfg.progress and sys.stdout.isatty()), mininterval=0.5)


# Dense bf16 peak TFLOP/s per GPU (vendor data sheets; SXM parts), by a part of the name torch
# reports, longer parts first ("A100" before "A10")
_CUDA_BF16_PEAK = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def _cuda_bf16_peak(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((peak for part, peak in _CUDA_BF16_PEAK.items() if part in name), 0.0)


def _log_line(record: dict, steps: int, seconds_per_step: float) -> str:
    """"step 20/400  loss 3.2140  lr 1.00e-03  512 samples/s  ETA 04:10": one per logged step."""
    from tqdm import tqdm

    eta = tqdm.format_interval(seconds_per_step * (steps - record["step"]))
    return (f"step {record['step']}/{steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
            f"{record['samples_per_s']:.0f} samples/s  ETA {eta}")


def run(cfg: Config) -> dict:
    """Train, evaluate and export one run; returns the final retrieval on data.eval_sources."""
    device = resolve_device(cfg.train.device)
    env = parallel.init_distributed(device.type, cfg.parallel)
    if env.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
    random.seed(cfg.run.seed + env.rank)
    run_dir = cfg.run_dir
    try:
        trainer = Trainer(cfg, env, device)
        trainer.maybe_resume()  # the last checks (what it starts from fits this config): then the run folder
        n_params = sum(p.numel() for p in trainer.task.model.parameters())
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(to_yaml(cfg))
            log.info("run folder %s", run_dir)
            log.info("model: %.1fM parameters, modalities %s, device %s, %d process(es)",
                     n_params / 1e6, cfg.model.modalities, device, env.world_size)
        results = trainer.fit()
        state = trainer.full_state()
        if env.is_main:
            export_model(state, cfg, run_dir / "export")
            plot_curves(run_dir)
            for s in trainer.eval_sets:
                if s.kind == "retrieval":
                    kind = "held-out zero-shot" if s.zero_shot else "held-out"
                    print(f"\n{kind} retrieval, {s.name} ({len(s.urls)} eval shard(s)):")
                    print(format_table(results[s.name]))
            if any(s.kind != "retrieval" for s in trainer.eval_sets):
                print("\nclassification (zero-shot: prompts of the class names; linear probe: a head on frozen "
                      "train/ embeddings):")
                print(format_classification(results, trainer.eval_sets))
            print(f"\nwrote {run_dir}/: config.yaml metrics.jsonl checkpoints/ eval/ (retrieval.json, one "
                  f"JSON per eval set) export/ curves.png")
        return results["retrieval"]
    finally:
        parallel.cleanup()


SHIPPED = Path(__file__).parent / "configs"  # package data; configs/ in a clone is the same folder


def shipped_configs() -> str:
    return ", ".join(sorted(str(p.relative_to(SHIPPED).with_suffix("")) for p in SHIPPED.glob("**/*.yaml")))


def config_path(arg: str) -> Path:
    """A config file, or the name of a shipped config (with or without .yaml), from any folder."""
    path = Path(arg)
    if path.exists():
        return path
    shipped = SHIPPED / (arg if arg.endswith(".yaml") else f"{arg}.yaml")
    if not path.is_absolute() and ".." not in path.parts and shipped.is_file():  # "tiny", "recipes/lit"
        return shipped
    raise ConfigError(f"{arg}: no such config file; expected a YAML file or a shipped config's name "
                      f"({shipped_configs()})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmpretrain.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="a YAML config file or a shipped config's name "
                   f"({shipped_configs()}); none: the built-in defaults")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = p.parse_intermixed_args(argv)
    config, overrides = args.config, args.overrides
    if config is not None and "=" in config and not Path(config).exists():  # overrides only
        config, overrides = None, [config, *overrides]
    logging.basicConfig(level=parallel.log_level(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        cfg = load_config(config and config_path(config), overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    try:
        run(cfg)
    except ConfigError as e:  # found past the schema: data, environment, checkpoint
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:  # a diverged run: one line naming the terms and the likely setting
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Preempted as e:
        log.warning("%s", e)
        return 143  # 128 + SIGTERM: interrupted, but resumable
    return 0


if __name__ == "__main__":
    sys.exit(main())
