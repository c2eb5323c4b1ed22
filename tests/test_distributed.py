"""Two CPU processes with gloo: data-parallel training and the contrastive gather."""

import io
import json
import os
import queue as queues
import shutil
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from mmpretrain import parallel
from mmpretrain.config import ParallelConfig, load_config
from mmpretrain.build import build, build_task, train_step
from mmpretrain.model import ModelOutput
from mmpretrain.objectives import contrastive_losses

from conftest import assert_same_run, ROOT, run, small_eval_shard, synthetic_batch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank, world, port, sp=1, cp=1):
    """Join a gloo group on CPU, with every GPU hidden (the tests must behave alike on a GPU machine)."""
    os.environ.update(CUDA_VISIBLE_DEVICES="", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    return parallel.init_distributed("cpu", ParallelConfig(sp=sp, cp=cp))


# forkserver, not spawn: the server imports torch and mmpretrain once a session and each worker is
# a fork of it, where a spawned worker imports them again (some 8 s a worker on 2 cores). The
# server runs no torch op, so no thread pool is forked (a fork of the test process could be).
_WORKERS = mp.get_context("forkserver")
_WORKERS.set_forkserver_preload(["torch", "torch.distributed.checkpoint", "torch.distributed.fsdp",
                                 "mmpretrain.train", "mmpretrain.build", "mmpretrain.tokenizer"])


def _run_workers(target, *args, world=2):
    ctx = _WORKERS
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = sorted((torch.load(io.BytesIO(queue.get(timeout=240))) for _ in procs), key=lambda r: r[0])
    except queues.Empty:
        pytest.fail(f"a worker sent nothing within 240 s (exit codes {[p.exitcode for p in procs]})")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return results


def _send(queue, *result):
    """Tensors as bytes: shared-memory handles die with the worker that made them."""
    buf = io.BytesIO()
    torch.save(result, buf)
    queue.put(buf.getvalue())


def _gather_worker(rank, world, port, feats, split, queue):
    env = _join(rank, world, port)
    rows = split[rank]  # uneven: token-budget batches differ in size across ranks
    local = {m: f[rows].clone().requires_grad_() for m, f in feats.items()}
    present = {m: torch.ones(len(local[m]), dtype=torch.bool) for m in local}
    scales = nn.ParameterDict({"text-image": nn.Parameter(torch.tensor(2.5, dtype=torch.float64))})
    loss = contrastive_losses(ModelOutput(local, present, None, None), scales,
                              env.gather_group)["contrastive/text-image"]
    loss.backward()
    # DDP averages gradients over ranks; the sum over ranks of grad/world is the full-batch gradient
    _send(queue, rank, loss.item(), {m: t.grad for m, t in local.items()})
    parallel.cleanup()


@pytest.mark.parametrize("split", [[slice(0, 3), slice(3, 8)], [slice(0, 0), slice(0, 8)]],
                         ids=["3+5", "documents-only-rank"])
def test_contrastive_gather_equals_single_process_with_uneven_batches(split):
    torch.manual_seed(0)
    feats = {m: nn.functional.normalize(torch.randn(8, 6, dtype=torch.float64), dim=-1)
             for m in ("text", "image")}
    full = {m: f.clone().requires_grad_() for m, f in feats.items()}
    present = {m: torch.ones(8, dtype=torch.bool) for m in full}
    scales = nn.ParameterDict({"text-image": nn.Parameter(torch.tensor(2.5, dtype=torch.float64))})
    ref = contrastive_losses(ModelOutput(full, present, None, None), scales)["contrastive/text-image"]
    ref.backward()

    results = _run_workers(_gather_worker, feats, split)
    for _, loss, _ in results:
        assert abs(loss - ref.item()) < 1e-12  # every rank computes the loss of the global batch
    # The gather's backward sums every rank's (identical) loss gradient, so local rows carry
    # world x the full-batch gradient; DDP's average over ranks divides it back out.
    local = {m: torch.cat([grads[m] for _, _, grads in results]) / 2 for m in feats}
    for m in feats:
        torch.testing.assert_close(local[m], full[m].grad, rtol=1e-10, atol=1e-12)


def _torchrun(nproc: int, config: str, demo_cache, run_dir, *overrides) -> tuple[str, list[dict]]:
    """`torchrun -m mmpretrain.train` on CPU (GPUs hidden) -> (stderr, metrics.jsonl records); must exit 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_free_port()), "-m", "mmpretrain.train", str(ROOT / "configs" / config),
           f"data.demo.cache_dir={demo_cache}", f"run.dir={run_dir.parent}", f"run.name={run_dir.name}",
           "train.device=cpu", *overrides]
    proc = run(cmd, timeout=300, env={"OMP_NUM_THREADS": "1"}, cpu_only=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr, [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_two_processes(demo_cache, tmp_path):
    """DDP over 2 ranks, then the same run resumed on 2 ranks from its step-2 checkpoint: equal to
    the uninterrupted run, whose own logged steps are the reference (no third launch)."""
    run = tmp_path / "runs" / "ddp"
    common = ["train.steps=3", "train.log_every=1", "train.warmup_steps=1"]
    stderr, whole = _torchrun(2, "tiny.yaml", demo_cache, run, *common, "train.checkpoint_every=2")
    assert [m["step"] for m in whole] == [1, 2, 3]
    assert "2 process(es)" in stderr
    assert stderr.count("INFO mmpretrain: parameters:") == 1  # rank 0's INFO lines only
    assert "find_unused_parameters" not in stderr  # the paired demo corpus: DDP is not told to search
    assert json.loads((run / "eval" / "retrieval.json").read_text())["text->image"]["n"] == 100
    shutil.rmtree(run / "checkpoints" / "step_00000003")  # the newest left: step 2's, written by 2 ranks
    stderr, resumed = _torchrun(2, "tiny.yaml", demo_cache, run, *common,
                                f"data.eval_sources=[{small_eval_shard(tmp_path)}]")  # its evaluation: checked above
    assert "written by 2 process(es)" in stderr and [m["step"] for m in resumed] == [1, 2, 3]
    assert_same_run([m["loss"] for m in resumed], [m["loss"] for m in whole])


def _ddp_worker(rank, world, port, queue):
    """Two DDP steps of tiny.yaml on batches of image, audio and captions, with data.sources the
    paired demo corpus, then own shards (which may lack a modality) in batches without audio."""
    env = _join(rank, world, port)
    results = []
    for sources, audio in (("demo", True), ("own-{000..003}.tar", False)):
        cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.sources=[{sources}]", "train.device=cpu"])
        built = build(cfg, env, torch.device("cpu"))
        torch.manual_seed(rank)
        batch, _ = synthetic_batch(cfg, n=4)
        batch.present["audio"][:] = audio
        before = {n: p.detach().clone() for n, p in built.task.named_parameters()}
        for step in range(2):
            train_step(built.task, built.wrapped, built.optimizer, built.scheduler, built.autocast, iter([batch]),
                       cfg.train, step)
        still = sorted(n for n, p in built.task.named_parameters() if torch.equal(p.detach(), before[n]))
        results.append((built.wrapped.find_unused_parameters, still))
    _send(queue, rank, results)
    parallel.cleanup()


def test_ddp_searches_for_unused_parameters_only_where_some_may_be_unused():
    """DDP's find_unused_parameters follows the config: off on the paired demo corpus (every
    parameter trains), on for own shards, where a batch without audio leaves the audio tower and
    its pairs' temperatures without gradient, and untouched, as on one process."""
    audio_pairs = {"objectives.logit_scale.text-audio", "objectives.logit_scale.image-audio"}
    for rank, (paired_run, (find_unused, still)) in _run_workers(_ddp_worker):
        assert paired_run == (False, []), rank
        assert find_unused and audio_pairs | {"model.towers.audio.fusion.to_decoder.weight"} <= set(still), rank
        assert all(n.startswith("model.towers.audio.") or n in audio_pairs for n in still), still


SP_CFG = ["model.decoder.heads=4", "model.decoder.width=32", "model.decoder.layers=2",
          "objectives.next_token_max_samples=0"]


def _sp_setup(ckpt="none", contrastive="infonce"):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", SP_CFG + [f"parallel.activation_checkpointing={ckpt}",
                                                              f"objectives.contrastive={contrastive}"])
    torch.manual_seed(0)
    batch, tok = synthetic_batch(cfg, n=5, partial=True)  # packed rows of uneven lengths
    torch.manual_seed(1)
    return cfg, batch, build_task(cfg, tok.vocab_size)


def _loss_and_grads(batch, task, loss_module):
    captured = {}
    task.model.decoder.register_forward_hook(lambda m, a, out: captured.setdefault("h", out.detach()))
    loss, _ = loss_module(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}
    return loss.item(), captured["h"], grads


def _sp_worker(rank, world, port, ckpt, contrastive, queue, sp=2, cp=1):
    env = _join(rank, world, port, sp=sp, cp=cp)
    cfg, batch, task = _sp_setup(ckpt, contrastive)
    _send(queue, rank, *_loss_and_grads(batch, task, parallel.parallelize(task, env, cfg.parallel)))
    parallel.cleanup()


@pytest.mark.parametrize("ckpt,contrastive", [("none", "infonce"), ("full", "infonce"), ("none", "siglip")])
def test_ulysses_matches_single_process(ckpt, contrastive):
    """sp=2 over packed variable-length rows: same decoder output, loss and every gradient (the
    contrastive loss, InfoNCE or SigLIP's ring, over the data-parallel group only)."""
    _, batch, task = _sp_setup(contrastive=contrastive)
    ref_loss, ref_h, ref_grads = _loss_and_grads(batch, task, task)
    for rank, loss, h, grads in _run_workers(_sp_worker, ckpt, contrastive):
        assert abs(loss - ref_loss) < 1e-5
        torch.testing.assert_close(h, ref_h, rtol=1e-5, atol=1e-5)
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-5, msg=f"rank {rank}: {name}")


def test_torchrun_long_context_sequence_parallel(demo_cache, tmp_path):
    """configs/long_context.yaml as shipped: token-budget rows, sp=2, checkpointed blocks."""
    _, metrics = _torchrun(2, "long_context.yaml", demo_cache, tmp_path / "runs" / "lc", "train.steps=2",
                           "train.warmup_steps=1", "train.log_every=1", "data.max_tokens=512",
                           "model.decoder.layers=2")
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(0.5 < m["packing_efficiency"] <= 1.0 and m["tokens"] <= 512 for m in metrics)


@pytest.mark.slow
def test_torchrun_four_processes_dp_by_sp(demo_cache, tmp_path):
    """dp=2 x sp=2 with pairs and documents mixed: ranks' graphs differ, collectives must not."""
    _, metrics = _torchrun(4, "long_context.yaml", demo_cache, tmp_path / "runs" / "lc4", "train.steps=3",
                           "train.warmup_steps=1", "train.log_every=1", "data.max_tokens=384",
                           "model.decoder.layers=1",  # its evaluation, unchecked here, of a small shard
                           f"data.eval_sources=[{small_eval_shard(tmp_path)}]")
    assert [m["step"] for m in metrics] == [1, 2, 3]
