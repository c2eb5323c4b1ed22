"""Two CPU processes with gloo: data-parallel training and the contrastive gather."""

import json
import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from mmpretrain.objectives import contrastive_losses
from mmpretrain.model import ModelOutput

from conftest import ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank, world, port, feats, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n = len(feats["text"]) // world
    local = {m: f[rank * n:(rank + 1) * n].clone().requires_grad_() for m, f in feats.items()}
    present = {m: torch.ones(n, dtype=torch.bool) for m in local}
    scales = nn.ParameterDict({"text-image": nn.Parameter(torch.tensor(2.5, dtype=torch.float64))})
    loss = contrastive_losses(ModelOutput(local, present, None, None), scales, 100.0)["contrastive/text-image"]
    loss.backward()
    # DDP averages gradients over ranks; the sum over ranks of grad/world is the full-batch gradient
    queue.put((rank, loss.item(), {m: t.grad for m, t in local.items()}))
    dist.destroy_process_group()


def test_contrastive_gather_equals_single_process():
    torch.manual_seed(0)
    feats = {m: nn.functional.normalize(torch.randn(8, 6, dtype=torch.float64), dim=-1)
             for m in ("text", "image")}
    full = {m: f.clone().requires_grad_() for m, f in feats.items()}
    present = {m: torch.ones(8, dtype=torch.bool) for m in full}
    scales = nn.ParameterDict({"text-image": nn.Parameter(torch.tensor(2.5, dtype=torch.float64))})
    ref = contrastive_losses(ModelOutput(full, present, None, None), scales, 100.0)["contrastive/text-image"]
    ref.backward()

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_gather_worker, args=(r, 2, port, feats, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for _, loss, _ in results:
        assert abs(loss - ref.item()) < 1e-12  # every rank computes the loss of the global batch
    # The gather's backward sums every rank's (identical) loss gradient, so local rows carry
    # world x the full-batch gradient; DDP's average over ranks divides it back out.
    local = {m: torch.cat([grads[m] for _, _, grads in results]) / 2 for m in feats}
    for m in feats:
        torch.testing.assert_close(local[m], full[m].grad, rtol=1e-10, atol=1e-12)


def test_torchrun_two_processes(demo_cache, tmp_path):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "mmpretrain.train", str(ROOT / "configs" / "tiny.yaml"),
           f"data.demo.cache_dir={demo_cache}", f"run.dir={runs}", "run.name=ddp", "train.steps=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(l) for l in (runs / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert "2 process(es)" in proc.stderr
    assert json.loads((runs / "ddp" / "eval" / "retrieval.json").read_text())["text->image"]["n"] == 100
