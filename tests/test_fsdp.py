"""FSDP2 and distributed checkpoints on CPU processes with gloo (2 and 4 of them)."""

import json
import signal
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_same_run, ROOT, run, small_eval_shard, synthetic_batch
from test_distributed import SP_CFG, _join, _run_workers, _send, _torchrun

from mmpretrain import checkpoint, parallel
from mmpretrain.build import build_task
from mmpretrain.config import ParallelConfig, load_config
from mmpretrain.optim import build_optimizer
from mmpretrain.parallel.fsdp import materialize


def _task(ckpt="none", *extra):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", SP_CFG + [f"parallel.activation_checkpointing={ckpt}",
                                                              "parallel.dp_shard=fsdp", *extra])
    torch.manual_seed(1)
    task = build_task(cfg, 49408)
    task.model.freeze(cfg.train.freeze)  # as build() does, before any wrapper
    return cfg, task


def _batches(cfg, n):
    """n different batches of packed rows of uneven lengths, some media missing."""
    out = []
    for i in range(n):
        torch.manual_seed(100 + i)
        out.append(synthetic_batch(cfg, n=4 + i, partial=True)[0])
    return out


def _full_grads(task):
    return {n.replace("._checkpoint_wrapped_module", ""):  # the checkpoint wrapper's level
            (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in task.named_parameters() if p.grad is not None}


def _fsdp_worker(rank, world, port, sp, ckpt, frozen, queue):
    env = _join(rank, world, port, sp=sp)
    cfg, task = _task(ckpt, f"train.freeze={frozen}")  # no gather group: each rank's loss on its own batch (the gather: its own test)
    loss_fn = parallel.parallelize(task, env, ParallelConfig(sp=sp, dp_shard="fsdp", activation_checkpointing=ckpt))
    batch = _batches(cfg, env.dp_size)[env.dp_rank]
    loss, _ = loss_fn(batch)
    loss.backward()
    assert all(type(p).__name__ == "DTensor" for p in task.parameters())  # sharded, all of them
    grads = _full_grads(task)
    norm = torch.nn.utils.clip_grad_norm_(task.parameters(), 0.5)  # over the shards, as train_step does
    _send(queue, rank, loss.item(), grads, norm.full_tensor().item(), _full_grads(task))
    parallel.cleanup()


@pytest.mark.parametrize("world,sp,ckpt,frozen", [(2, 1, "none", "[]"), (2, 1, "full", "[]"), (2, 2, "none", "[]"),
                                                  (2, 2, "selective", "[]"), (2, 1, "none", "[decoder, image]"),
                                                  pytest.param(4, 2, "full", "[]", marks=pytest.mark.slow)],
                         ids=["dp2", "dp2-ckpt", "sp2", "sp2-selective", "dp2-frozen", "dp2xsp2-ckpt"])
def test_fsdp_loss_and_every_gradient_equal_one_process(world, sp, ckpt, frozen):
    """Rank r of dp trains on batch r: FSDP2's reduce-scattered gradients equal the mean of the
    per-batch gradients in one process (sp ranks share a batch, its tokens split by Ulysses), and
    so do the global gradient norm and the clipped gradients; frozen parts (train.freeze) get
    none on either side."""
    cfg, task = _task("none", f"train.freeze={frozen}")
    dp = world // sp
    losses = []
    for batch in _batches(cfg, dp):
        loss, _ = task(batch)
        (loss / dp).backward()
        losses.append(loss.item())
    ref = _full_grads(task)
    ref_norm = torch.nn.utils.clip_grad_norm_(task.parameters(), 0.5).item()
    clipped = _full_grads(task)
    if frozen != "[]":
        assert not any(n.startswith(("model.decoder.", "model.towers.image.encoder.")) for n in ref)
    for rank, loss, grads, norm, grads_clipped in _run_workers(_fsdp_worker, sp, ckpt, frozen, world=world):
        assert abs(norm - ref_norm) < 1e-4 * ref_norm
        for name, g in clipped.items():
            torch.testing.assert_close(grads_clipped[name], g, rtol=1e-4, atol=1e-6, msg=f"clipped {name}")
        assert abs(loss - losses[rank // sp]) < 1e-5
        assert ref.keys() <= grads.keys()
        for name in grads.keys() - ref.keys():  # no gradient anywhere (a pair without two samples):
            assert not grads[name].any(), name  # FSDP2 reduces it as zeros
        for name, g in ref.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=f"rank {rank}: {name}")


def test_meta_built_model_materializes_with_its_initialisation():
    """Built on meta and allocated by `materialize`: buffers equal a normally built model's, and
    every parameter has its initialisation (constants exactly, random ones with the same spread)."""
    extra = ["model.modalities=[image, audio, video]", "model.video.init_from_image=false"]
    _, ref = _task("none", *extra)
    with torch.device("meta"):
        _, task = _task("none", *extra)
    materialize(task, torch.device("cpu"), seed=7)
    for (name, b), (_, rb) in zip(task.named_buffers(), ref.named_buffers()):
        assert torch.equal(b, rb), name
    for (name, p), (_, rp) in zip(task.named_parameters(), ref.named_parameters()):
        assert torch.isfinite(p).all(), name
        if (rp == rp.flatten()[0]).all():  # a constant: zeros, ones, the temperatures
            assert torch.equal(p, rp), name
        else:
            assert not (p == p.flatten()[0]).all(), f"{name} was left constant"
            if rp.numel() >= 256:
                assert 0.7 < float(p.detach().std() / rp.detach().std()) < 1.4, name


def _ckpt_worker(rank, world, port, folder, write, queue):
    """Same batch on every rank (no gather): loss and step are those of one process on it."""
    env = _join(rank, world, port)
    cfg, task = _task()
    loss_fn = parallel.parallelize(task, env, ParallelConfig(dp_shard="fsdp"))
    optimizer = build_optimizer(task, cfg.train)
    batch = _batches(cfg, 1)[0]

    def step():
        loss, _ = loss_fn(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    if write:
        step()
        checkpoint.save_checkpoint(folder, 1, task, optimizer, {"rank": rank}, keep=2)
    else:
        local = checkpoint.load_checkpoint(folder / "checkpoints" / "step_00000001", task, optimizer)
        assert local["writers"] == 2 and local["rank"] == (rank if rank < 2 else 0)
    _send(queue, rank, [step(), step()])
    parallel.cleanup()


def _single_process_resume(folder):
    cfg, task = _task()
    optimizer = build_optimizer(task, cfg.train)
    checkpoint.load_checkpoint(folder / "checkpoints" / "step_00000001", task, optimizer)
    loaded = {k: v.clone() for k, v in task.model.state_dict().items()}
    batch = _batches(cfg, 1)[0]
    out = []
    for _ in range(2):
        loss, _ = task(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        out.append(loss.item())
    return out, loaded


def test_dcp_checkpoint_of_two_ranks_resumes_on_two_one_and_four(tmp_path, capsys):
    """Written by 2 FSDP2 ranks (each its shards): resumed on 2 the next losses are bitwise those of
    the writers going on; on 1 process and on 4 ranks (resharded) they agree within fp32 tolerance,
    optimizer state included (two steps after loading)."""
    (tmp_path / "checkpoints").mkdir()
    written = _run_workers(_ckpt_worker, tmp_path, True)
    ckpt = tmp_path / "checkpoints" / "step_00000001"
    assert checkpoint.is_checkpoint(ckpt) and {p.name for p in ckpt.glob("__*.distcp")} == {"__0_0.distcp",
                                                                                            "__1_0.distcp"}
    expected = written[0][1]
    for _, losses in _run_workers(_ckpt_worker, tmp_path, False):
        assert losses == expected  # bitwise
    losses, loaded = _single_process_resume(tmp_path)
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-6)
    for _, losses in _run_workers(_ckpt_worker, tmp_path, False, world=4):
        torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-6)
    assert checkpoint.main(["info", str(ckpt)]) == 0
    assert "step 1, written by 2 process(es) (2 shard files)" in capsys.readouterr().out
    # consolidate: one file of the model's full tensors, equal to the sharded ones
    out = tmp_path / "model.safetensors"
    assert checkpoint.main(["consolidate", str(ckpt), str(out)]) == 0
    from safetensors.torch import load_file

    tensors = load_file(out)
    assert tensors.keys() == loaded.keys()
    for k, v in loaded.items():
        assert torch.equal(tensors[k], v), k


KILL_AT_STEP_4 = """
import os, signal, sys
from mmpretrain import checkpoint, train
write = checkpoint.write_marker
def die(folder, info):  # every shard and rank file of step 4 is on disk; its marker is not
    if info["step"] == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    write(folder, info)
checkpoint.write_marker = die
sys.exit(train.main(sys.argv[1:]))
"""


def test_sigkill_while_a_checkpoint_is_written_leaves_the_previous_one_usable(demo_cache, tmp_path):
    args = [str(ROOT / "configs" / "tiny.yaml"), f"data.demo.cache_dir={demo_cache}", f"run.dir={tmp_path}",
            "train.device=cpu", "train.steps=6", "train.checkpoint_every=2", "train.log_every=1",
            f"data.eval_sources=[{small_eval_shard(tmp_path)}]"]  # nothing here checks the final evaluation
    killed = run([sys.executable, "-c", KILL_AT_STEP_4, *args, "run.name=killed"], timeout=240, cpu_only=True)
    assert killed.returncode == -signal.SIGKILL
    folder = tmp_path / "killed" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000002", "step_00000004.partial"]
    assert checkpoint.latest_checkpoint(tmp_path / "killed").name == "step_00000002"
    resumed = run([sys.executable, "-m", "mmpretrain.train", *args, "run.name=killed"], timeout=240, cpu_only=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr and "step_00000002" in resumed.stderr
    whole = run([sys.executable, "-m", "mmpretrain.train", *args, "run.name=whole"], timeout=240, cpu_only=True)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert_same_run(_metrics(tmp_path / "killed"), _metrics(tmp_path / "whole"))  # steps 1..6 once each
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000004", "step_00000006"]  # keep 2


def _metrics(run_dir):
    keep = ("step", "loss", "grad_norm", "next_token")
    return [{k: m[k] for k in keep if k in m} for m in map(json.loads, (run_dir / "metrics.jsonl").open())]


def test_torchrun_fsdp_trains_checkpoints_and_resumes_on_one_process(demo_cache, tmp_path):
    """`torchrun --nproc_per_node 2 -m mmpretrain.train ... parallel.dp_shard=fsdp` (a checkpoint
    written in the background at step 1), then the run resumed by one process from the sharded
    checkpoint of step 2."""
    run_dir = tmp_path / "runs" / "fsdp"
    stderr, metrics = _torchrun(2, "tiny.yaml", demo_cache, run_dir, "train.steps=2", "parallel.dp_shard=fsdp",
                                "train.log_every=1", "train.checkpoint_every=1", "train.async_checkpoint=true")
    assert "FSDP2: " in stderr and [m["step"] for m in metrics] == [1, 2]
    assert [p.name for p in checkpoint.checkpoint_dirs(run_dir)] == ["step_00000001", "step_00000002"]
    assert len(list((run_dir / "checkpoints" / "step_00000001").glob("__*.distcp"))) == 2  # written async
    assert len(list((run_dir / "tb" / "train").iterdir())) == 1  # rank 0's event file only
    assert {pair: t > 0 for pair, t in metrics[0]["temperature"].items()} == \
        {"text-image": True, "text-audio": True, "image-audio": True}  # the sharded scales, gathered
    assert json.loads((run_dir / "eval" / "retrieval.json").read_text())["text->image"]["n"] == 100
    one = run([sys.executable, "-m", "mmpretrain.train", str(ROOT / "configs" / "tiny.yaml"),
               f"data.demo.cache_dir={demo_cache}", f"run.dir={run_dir.parent}", "run.name=fsdp",
               "train.device=cpu", "train.steps=3", "train.log_every=1",
               f"data.eval_sources=[{small_eval_shard(tmp_path)}]"],  # its evaluation: unchecked (the 2 ranks': above)
              timeout=240, cpu_only=True)
    assert one.returncode == 0, one.stderr[-2000:]
    assert "written by 2 process(es)" in one.stderr
    assert [m["step"] for m in map(json.loads, (run_dir / "metrics.jsonl").open())] == [1, 2, 3]


def test_torchrun_fsdp_resumes_when_a_tower_saw_no_data(demo_cache, tmp_path):
    """FSDP2 on 2 ranks over image-only shards (the audio tower gets no gradient and no optimizer
    state; under FSDP2 the unused temperatures of the root unit get zeros), stopped and resumed
    on 2 ranks."""
    from test_train import write_partial_shards

    images = write_partial_shards(tmp_path, "images", 32, ("flac",))
    own = [f"data.sources=[{images}]", f"data.eval_sources=[{images}]", "train.batch_size=8",
           "parallel.dp_shard=fsdp", "train.log_every=1"]
    run_dir = tmp_path / "runs" / "fsdp"
    stderr, _ = _torchrun(2, "tiny.yaml", demo_cache, run_dir, "train.steps=1", *own)
    assert "has audio: the audio tower(s) do not train" in stderr
    stderr, metrics = _torchrun(2, "tiny.yaml", demo_cache, run_dir, "train.steps=2", *own)
    assert "written by 2 process(es)" in stderr and [m["step"] for m in metrics] == [1, 2]


def test_torchrun_fsdp_bf16_mixed_precision_trains_evaluates_and_exports_fp32(demo_cache, tmp_path):
    """train.precision=bf16 under FSDP2 (bf16 compute parameters, fp32 reduction and shards), as
    on GPUs: the losses follow fp32's, the evaluation runs (it once met bf16 parameters with fp32
    inputs) and the export holds the fp32 shards."""
    from safetensors.torch import load_file

    from mmpretrain.data.sources import demo_classification_sets
    from mmpretrain.eval.classify import read_samples, split_shards, write_dataset
    from mmpretrain.eval.sets import Evaluator, run_sets
    from mmpretrain.pretrained import load_pretrained

    # evaluated at step 2 and at the end, each split across the 2 ranks: a set of one sample leaves
    # rank 1 nothing to embed, which under FSDP2 only gathered parameters survive
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.demo.cache_dir={demo_cache}"])
    shapes = demo_classification_sets(cfg.data, ["image"])["image-shape"]
    _, first = next(read_samples(split_shards(shapes, "test")))
    one = write_dataset(tmp_path / "one", ["circle", "square"], ["a {c}"], {"test": [("png", first["png"], 0)]})
    sets = f"eval.sets=[{{name: one, kind: classification, path: {one}}}]"
    losses = {}
    for precision in ("fp32", "bf16"):
        run_dir = tmp_path / "runs" / precision
        _, metrics = _torchrun(2, "tiny.yaml", demo_cache, run_dir, "train.steps=3", "train.log_every=1",
                               "parallel.dp_shard=fsdp", f"train.precision={precision}", "train.eval_every=2", sets)
        losses[precision] = [m["loss"] for m in metrics]
        history = [json.loads(line) for line in (run_dir / "eval" / "history.jsonl").read_text().splitlines()]
        assert [h["step"] for h in history] == [2, 3] and history[0]["one"]["n"] == 1
        assert history[1]["retrieval"]["text->image"]["n"] == 100  # each sample once, not once per rank
    torch.testing.assert_close(losses["bf16"], losses["fp32"], rtol=2e-2, atol=0)
    # the fp32 run's final evaluation, split over 2 ranks, is one process's on the export
    fp32 = tmp_path / "runs" / "fp32"
    export = load_pretrained(fp32 / "export")
    run_cfg = load_config(fp32 / "config.yaml")
    alone = Evaluator(export.model, run_cfg, export.tokenizer, "cpu").evaluate(run_sets(run_cfg))
    split = {name: json.loads((fp32 / "eval" / f"{name}.json").read_text()) for name in alone}
    for direction, r in alone["retrieval"].items():
        assert split["retrieval"][direction] == pytest.approx(r, abs=0.011), direction
    for name in set(alone) - {"retrieval"}:
        assert split[name]["acc1"] == pytest.approx(alone[name]["acc1"], abs=0.011), name
    assert {t.dtype for t in load_file(run_dir / "export" / "model.safetensors").values()} == {torch.float32}


@pytest.mark.parametrize("dp_shard", ["fsdp", "ddp"])
def test_torchrun_continued_pretraining_from_an_export(demo_cache, tiny_cfg, tmp_path, dp_shard):
    """train.init_from on 2 ranks: rank 0 reads the export and the weights are broadcast (each
    rank keeping its shard under FSDP2); the new video tower keeps its fresh initialisation."""
    from safetensors.torch import load_file

    from mmpretrain import train

    small = f"data.eval_sources=[{small_eval_shard(tmp_path)}]"  # neither run's evaluation is checked here
    first = tiny_cfg("train.steps=1", "run.name=first", small)
    train.run(first)
    source = load_file(first.run_dir / "export" / "model.safetensors")
    run_dir = tmp_path / "runs" / "continued"
    stderr, _ = _torchrun(2, "tiny.yaml", demo_cache, run_dir, "train.steps=1", f"parallel.dp_shard={dp_shard}",
                          f"train.init_from={first.run_dir / 'export'}", "train.lr=0", "train.weight_decay=0",
                          "model.modalities=[image, audio, video]", "model.video.num_frames=4",
                          "model.video.width=32", "model.video.heads=2", "model.video.depth=1", small)
    assert "initialised afresh: objectives.logit_scale, towers.video" in stderr
    after = load_file(run_dir / "export" / "model.safetensors")
    for key, value in source.items():  # lr 0: every source tensor as loaded
        assert torch.equal(after[key], value), key
    assert after["towers.video.encoder.blocks.0.attn.qkv.weight"].std() > 0


def test_async_checkpoints_complete_and_resume_exactly(tiny_cfg):
    """train.async_checkpoint: the run's losses are those of a synchronous run, every checkpoint
    is completed (the one in flight at the next save), and resuming from one is exact."""
    from mmpretrain import train

    steps = ["train.checkpoint_every=2", "train.log_every=1", "train.keep_checkpoints=5"]
    sync = tiny_cfg("train.steps=6", "run.name=sync", *steps)
    train.run(sync)
    background = tiny_cfg("train.steps=6", "run.name=async", "train.async_checkpoint=true", *steps)
    train.run(background)
    assert _metrics(background.run_dir) == _metrics(sync.run_dir)
    done = [p.name for p in checkpoint.checkpoint_dirs(background.run_dir)]
    assert done == ["step_00000002", "step_00000004", "step_00000006"]
    assert not list((background.run_dir / "checkpoints").glob("*.partial"))
    cut = tiny_cfg("train.steps=6", "run.name=cut", "train.async_checkpoint=true",
                   f"train.resume={background.run_dir / 'checkpoints' / 'step_00000002'}", *steps)
    train.run(cut)
    assert_same_run(_metrics(cut.run_dir), _metrics(sync.run_dir)[2:])


def _meta_video_worker(rank, world, port, queue):
    """A model with a video tower started from the image tower's weights, built on meta and
    materialised shard by shard: the copy happens on the shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    env = _join(rank, world, port)
    with torch.device("meta"):
        cfg, task = _task("none", "model.modalities=[image, video]", "model.video={frame_size: 16, patch_size: 4, "
                          "width: 32, depth: 1, heads: 2, num_frames: 4, init_from_image: true}")
    parallel.parallelize(task, env, cfg.parallel)
    materialize(task, torch.device("cpu"), seed=rank)
    full = get_model_state_dict(task.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    _send(queue, rank, full if rank == 0 else {})
    parallel.cleanup()


def test_fsdp_meta_build_copies_the_image_tower_into_the_video_tower():
    (_, full), _ = _run_workers(_meta_video_worker)
    image, video = "towers.image.encoder.vit.", "towers.video.encoder."
    for name in ("blocks.0.attn.qkv.weight", "blocks.0.mlp.fc2.bias", "norm.weight", "cls_token", "pos_embed"):
        assert torch.equal(full[video + name], full[image + name]), name
    assert full[video + "blocks.0.attn.qkv.weight"].std() > 0  # initialised, not left empty
    kernel = full[image + "patch_embed.proj.weight"]  # (C, 3, p, p) spread over the tubelet
    spread = full[video + "patch_embed.weight"]
    torch.testing.assert_close(spread.sum(2), kernel)


@pytest.mark.slow
@pytest.mark.xdist_group("inductor")  # after the single-process compile test, on its worker
def test_torchrun_fsdp_with_compiled_blocks_matches_eager(demo_cache, inductor_cache, tmp_path, monkeypatch):
    """parallel.compile=on composes with FSDP2 (blocks compiled, then sharded): the same losses.
    And no graph is cached on disk with guards that name a module (`L['self']...`): such an entry
    made the next process that found it fail with KeyError: 'self' (see parallel/compile.py)."""
    cache = Path(inductor_cache)  # shared with test_compiled_blocks_equal_eager_without_graph_breaks
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    runs = {}
    small = f"data.eval_sources=[{small_eval_shard(tmp_path)}]"  # the final evaluation (compiled too) is unchecked
    for mode in ("off", "on"):
        _, metrics = _torchrun(2, "tiny.yaml", demo_cache, tmp_path / "runs" / mode, "train.steps=3",
                               "train.log_every=1", "parallel.dp_shard=fsdp", f"parallel.compile={mode}",
                               "model.modalities=[image]", small)  # one tower: its timm blocks compile too
        runs[mode] = [m["loss"] for m in metrics]
    torch.testing.assert_close(runs["on"], runs["off"], rtol=1e-4, atol=1e-5)
    assert any(cache.rglob("*.so"))  # the runs used this cache folder (kernels are still cached there)
    named = [p for p in (cache / "fxgraph").rglob("*") if p.is_file() and b"L['self']" in p.read_bytes()]
    assert not named, named
