"""The whole multimodal training step, and the contrastive step against open_clip, at one size.

    python benchmarks/multimodal_step.py                 # CUDA: realistic size, compiled; CPU: tiny, eager
    python benchmarks/multimodal_step.py --size tiny --steps 5

(a) Full step, the trainer's own (`build.train_step`: clipping, temperature clamp and schedule
    included): image ViT (ViT-B/16 at 224 px on CUDA), audio through the spectrogram transformer
    (10 s clips, 128 mels, 16x16 patches, ViT-B width), a decoder (~1B on CUDA: width 2048, 18
    layers), both objectives, bf16 autocast on CUDA, each block compiled (`--compile`, default on
    CUDA). Prints samples/s, packed tokens/s and MFU, with

        MFU = FLOPs per step / step time / peak,

    FLOPs per step counted by `torch.utils.flop_counter.FlopCounterMode` over one forward and
    backward: every matmul of the encoders, the fusion (attention pooling, projections), the
    decoder and the output head, and SDPA attention. Attention inside kernels it has no formula
    for (varlen, xformers, flex) is not counted, so with those the figure is a lower bound.
    Peak: 989 TFLOP/s dense bf16 (H100 SXM; `--peak` for another card). The number of graphs
    torch.compile built and the recompiles over the measured steps are printed too (packed rows
    change length every batch: dynamic shapes must keep recompiles bounded).
(b) Contrastive only: ours configured with open_clip ViT-B-16's shapes (ViT-B/16 224 px, text
    through a 12-layer width-512 decoder, next-token off) against open_clip's CLIP at the same
    shapes and batch (256 on CUDA), both compiled on CUDA, in the same process, interleaved;
    prints the ratio. On CPU both run at the tiny shapes of clip_step_cpu.py.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clip_step_cpu import TINY, VIT_B_16, build_open_clip, build_ours  # noqa: E402

SIZES = {  # (a)'s model: config overrides
    "realistic": ["model.image.image_size=224", "model.image.patch_size=16", "model.image.width=768",
                  "model.image.depth=12", "model.image.heads=12", "model.audio.clip_seconds=10",
                  "model.audio.n_mels=128", "model.audio.patch_freq=16", "model.audio.patch_time=16",
                  "model.audio.width=768", "model.audio.depth=12", "model.audio.heads=12",
                  "model.fusion.num_latents=32", "model.fusion.heads=12", "model.fusion.embed_dim=512",
                  "model.decoder.width=2048", "model.decoder.layers=18", "model.decoder.heads=16"],
    "tiny": ["model.image.width=64", "model.image.depth=2", "model.image.heads=4", "model.audio.width=64",
             "model.audio.depth=2", "model.audio.heads=4", "model.fusion.heads=4", "model.decoder.width=128",
             "model.decoder.layers=2", "model.decoder.heads=4"],
}


def timed(step, n: int, device: str) -> float:
    """Seconds per step over n steps (after the caller's warm-up)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return (time.perf_counter() - start) / n


def full_step(size: str, batch: int, device: str, compile: bool):
    from mmpretrain.batch import collate
    from mmpretrain.build import build, train_step
    from mmpretrain.config import load_config
    from mmpretrain.data.samples import SampleParser
    from mmpretrain.packing import RowLayout
    from mmpretrain.parallel import DistEnv
    from mmpretrain.tokenizer import Tokenizer

    cfg = load_config(None, [*SIZES[size], f"parallel.compile={'on' if compile else 'off'}"])
    tok = Tokenizer(cfg.model.text)
    shapes = SampleParser(cfg, False, tok).media_shapes()
    layout = RowLayout.from_config(cfg)
    specs = SampleParser(cfg, False, tok).specs
    batches, rows = [], []
    for seed in range(4):  # four batches: the packed row's length changes every step, as in training
        g = torch.Generator().manual_seed(seed)
        samples = []
        for i in range(batch):  # captions of 7-20 tokens, every sample with image and audio
            n = int(torch.randint(7, 21, (1,), generator=g))
            tokens = torch.zeros(cfg.model.text.context_length, dtype=torch.long)
            tokens[0], tokens[1 : n - 1], tokens[n - 1] = (tok.sot_id, torch.randint(1, 49000, (n - 2,), generator=g),
                                                           tok.eot_id)
            samples.append({"__key__": str(i), "tokens": tokens, "length": n, "captions": [""],
                            **{m: torch.randn(shape, generator=g) for m, shape in shapes.items()}})
        batches.append(collate(samples, shapes, cfg.model.text.context_length).to(device))
        rows.append(sum(layout.sample_tokens(s, i, specs) for i, s in enumerate(samples)))
    b = build(cfg, DistEnv(), torch.device(device), tok)  # the trainer's objects, seeded with run.seed
    turn = itertools.cycle(batches)

    def step():  # the trainer's step: clipping, temperature clamp and schedule included
        train_step(b.task, b.wrapped, b.optimizer, b.scheduler, b.autocast, turn, cfg.train)

    params = sum(p.numel() for p in b.task.parameters())
    return step, b.task, batches, b.autocast, params, rows


def count_flops(task, data, autocast) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        with autocast:
            loss, _ = task(data)
        loss.backward()
    task.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--size", choices=list(SIZES), default="realistic" if cuda else "tiny")
    p.add_argument("--batch", type=int, default=32 if cuda else 8)
    p.add_argument("--clip-batch", type=int, default=256 if cuda else 128)
    p.add_argument("--steps", type=int, default=50 if cuda else 5, help="measured steps of (a)")
    p.add_argument("--clip-steps", type=int, default=20 if cuda else 5, help="steps per round of (b)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=cuda)
    p.add_argument("--peak", type=float, default=989e12, help="dense bf16 FLOP/s of the card (MFU)")
    a = p.parse_args()
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"{name}, torch {torch.__version__}, size {a.size}, compile {a.compile}")

    # (a) the full step
    import torch._dynamo.utils as dynamo_utils

    torch.manual_seed(0)
    step, task, batches, autocast, params, rows = full_step(a.size, a.batch, device, a.compile)
    flops = sum(count_flops(task, b, autocast) for b in batches) / len(batches)
    row = sum(rows) / len(rows)
    for _ in range(4):
        step()  # warm-up (compiles): one step of each batch
    graphs_before = dynamo_utils.counters["stats"]["unique_graphs"]
    seconds = timed(step, a.steps, device)
    recompiles = dynamo_utils.counters["stats"]["unique_graphs"] - graphs_before
    print(f"(a) full step: {params / 1e6:.0f}M parameters, batch {a.batch} (image + audio + caption), packed rows "
          f"of {min(rows)}-{max(rows)} tokens")
    print(f"    {a.batch / seconds:8.1f} samples/s  {row / seconds:10.0f} tokens/s  "
          f"{flops / 1e12:.3f} TFLOP/step  "
          + (f"MFU {flops / seconds / a.peak:6.1%}" if cuda else f"{flops / seconds / 1e9:.1f} GFLOP/s (no MFU on CPU)")
          + (f"  graphs {graphs_before}, recompiles over {a.steps} steps {recompiles}" if a.compile else ""))
    del step, task, batches

    # (b) contrastive step against open_clip
    shapes = VIT_B_16 if a.size == "realistic" else TINY
    ours, tokens = build_ours(a.clip_batch, shapes, device, a.compile)
    theirs = build_open_clip(a.clip_batch, tokens, shapes, device, a.compile)
    for s in (ours, theirs):
        for _ in range(3):
            s()
    t_ours, t_theirs = [], []
    for _ in range(3):  # interleaved rounds
        t_ours.append(timed(ours, a.clip_steps, device))
        t_theirs.append(timed(theirs, a.clip_steps, device))
    o, t = 1 / min(t_ours), 1 / min(t_theirs)
    print(f"(b) contrastive step, {'ViT-B-16' if shapes is VIT_B_16 else 'tiny'} shapes, batch {a.clip_batch}: "
          f"ours {o:.2f} steps/s, open_clip CLIP {t:.2f} steps/s, ratio {o / t:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
