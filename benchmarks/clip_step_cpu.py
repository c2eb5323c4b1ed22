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

import torch


def build_ours(batch: int):
    from mmpretrain.batch import collate
    from mmpretrain.config import load_config
    from mmpretrain.model import MultimodalModel
    from mmpretrain.objectives import Objectives, PretrainingTask
    from mmpretrain.packing import RowLayout
    from mmpretrain.tokenizer import Tokenizer

    cfg = load_config(None, [
        "model.modalities=[image]", "model.image.image_size=32", "model.image.patch_size=4",
        "model.image.width=96", "model.image.depth=3", "model.image.heads=4", "model.text.context_length=16",
        "model.fusion.num_latents=4", "model.fusion.heads=4", "model.fusion.embed_dim=128",
        "model.decoder.width=128", "model.decoder.layers=2", "model.decoder.heads=4",
        "objectives.next_token_weight=0", "objectives.media_pairs=false"])
    tok = Tokenizer(cfg.model.text)
    model = MultimodalModel(cfg.model, tok.vocab_size)
    task = PretrainingTask(model, Objectives(model.modalities, cfg.objectives), RowLayout.from_config(cfg))
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(batch):
        n = int(torch.randint(7, 13, (1,), generator=g))
        tokens = torch.zeros(16, dtype=torch.long)
        tokens[0], tokens[1 : n - 1], tokens[n - 1] = tok.sot_id, torch.randint(1, 49000, (n - 2,), generator=g), tok.eot_id
        samples.append({"__key__": str(i), "tokens": tokens, "length": n, "captions": [""],
                        "image": torch.randn(3, 32, 32, generator=g)})
    batch_ = collate(samples, {"image": (3, 32, 32)}, 16)
    opt = torch.optim.AdamW(task.parameters(), lr=1e-4)

    def step():
        loss, _ = task(batch_)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, batch_.tokens


def build_open_clip(batch: int, tokens: torch.Tensor):
    from open_clip.loss import ClipLoss
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    model = CLIP(128, CLIPVisionCfg(layers=3, width=96, head_width=24, patch_size=4, image_size=32),
                 CLIPTextCfg(context_length=16, vocab_size=49408, width=128, heads=4, layers=2))
    loss_fn, opt = ClipLoss(), torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def step():
        img, txt, scale = model(images, tokens)
        loss_fn(img, txt, scale).backward()
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
