"""Image-text contrastive training step on CPU: ours against open_clip's CLIP at matched tiny sizes.

    python benchmarks/clip_step_cpu.py [--steps 20] [--batch 128]

Both models get the same image tower shape (ViT, 32 px, patch 4, width 96, 3 layers, 4 heads),
the same text width/depth (128, 2 layers, 4 heads, open_clip's 49,408-token vocabulary, 16-token
context) and embedding width (128), the same batch of random images and captions of 7-12 tokens
(the demo corpus's range), AdamW, and one training step = forward, InfoNCE, backward, optimizer
step. Ours runs with `objectives.next_token_weight=0` (contrastive only: no caption rows, no
logits), so it does the work CLIP does, on packed captions. Eager on CPU (compiled runs belong to
the GPU benchmark); both in this process, interleaved in rounds. Prints steps/s and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shapes:
    """One image tower and one text tower, as both libraries spell them."""

    image_size: int = 32
    patch: int = 4
    image_width: int = 96
    image_layers: int = 3
    image_heads: int = 4
    context: int = 16
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    embed: int = 128


TINY = Shapes()
VIT_B_16 = Shapes(224, 16, 768, 12, 12, 77, 512, 12, 8, 512)  # open_clip's ViT-B-16


def build_ours(batch: int, s: Shapes = TINY, device: str = "cpu", compile: bool = False):
    from mmpretrain.batch import collate
    from mmpretrain.build import build_task
    from mmpretrain.config import load_config
    from mmpretrain.parallel.compile import apply_compile
    from mmpretrain.tokenizer import Tokenizer

    cfg = load_config(None, [
        "model.modalities=[image]", f"model.image.image_size={s.image_size}", f"model.image.patch_size={s.patch}",
        f"model.image.width={s.image_width}", f"model.image.depth={s.image_layers}",
        f"model.image.heads={s.image_heads}", f"model.text.context_length={s.context}",
        "model.fusion.num_latents=4", f"model.fusion.heads={s.image_heads}", f"model.fusion.embed_dim={s.embed}",
        f"model.decoder.width={s.text_width}", f"model.decoder.layers={s.text_layers}",
        f"model.decoder.heads={s.text_heads}", "objectives.next_token_weight=0", "objectives.media_pairs=false"])
    tok = Tokenizer(cfg.model.text)
    task = build_task(cfg, tok.vocab_size).to(device)
    if compile:
        apply_compile(task.model, device)
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(batch):
        n = int(torch.randint(7, 13, (1,), generator=g))
        tokens = torch.zeros(s.context, dtype=torch.long)
        tokens[0], tokens[1 : n - 1], tokens[n - 1] = tok.sot_id, torch.randint(1, 49000, (n - 2,), generator=g), tok.eot_id
        samples.append({"__key__": str(i), "tokens": tokens, "length": n, "captions": [""],
                        "image": torch.randn(3, s.image_size, s.image_size, generator=g)})
    batch_ = collate(samples, {"image": (3, s.image_size, s.image_size)}, s.context).to(device)
    opt = torch.optim.AdamW(task.parameters(), lr=1e-4)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step():
        with autocast:
            loss, _ = task(batch_)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, batch_.tokens


def build_open_clip(batch: int, tokens: torch.Tensor, s: Shapes = TINY, device: str = "cpu", compile: bool = False):
    from open_clip.loss import ClipLoss
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    model = CLIP(s.embed, CLIPVisionCfg(layers=s.image_layers, width=s.image_width,
                                        head_width=s.image_width // s.image_heads, patch_size=s.patch,
                                        image_size=s.image_size),
                 CLIPTextCfg(context_length=s.context, vocab_size=49408, width=s.text_width, heads=s.text_heads,
                             layers=s.text_layers)).to(device)
    loss_fn, opt = ClipLoss(), torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if compile else model
    images = torch.randn(batch, 3, s.image_size, s.image_size, generator=torch.Generator().manual_seed(0)).to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step():
        with autocast:
            img, txt, scale = forward(images, tokens)
            loss = loss_fn(img, txt, scale)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def rate(step, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step()
    return n / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    torch.manual_seed(0)
    ours, tokens = build_ours(a.batch)
    theirs = build_open_clip(a.batch, tokens)
    for step in (ours, theirs):  # warm-up
        rate(step, 3)
    r_ours, r_theirs = [], []
    for _ in range(a.rounds):  # interleaved, so drifting machine load hits both alike
        r_ours.append(rate(ours, a.steps))
        r_theirs.append(rate(theirs, a.steps))
    o, t = max(r_ours), max(r_theirs)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {a.batch}, best of {a.rounds} "
          f"rounds of {a.steps} steps")
    print(f"ours (contrastive only)  {o:7.2f} steps/s")
    print(f"open_clip CLIP           {t:7.2f} steps/s")
    print(f"ratio ours / open_clip   {o / t:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
