"""Diagnostic probes for benchmarks/learning_vs_openclip.py: which part of ours learns less than
open_clip's CLIP. Each probe patches one part of ours in this process (none is a config switch:
they answer a question, they are not features), then runs the real training entry point.

    python benchmarks/learning_probes.py PROBE[,PROBE...] [key=value ...]

Probes:
  open_clip_text    the caption embedding from open_clip's TextTransformer (same width, depth,
                    heads, context, vocabulary) instead of our decoder; use with
                    objectives.next_token_weight=0 (the decoder still runs, untrained by it)
  open_clip_image   the image embedding from open_clip's VisionTransformer (same sizes) instead of
                    our timm ViT + pooling; with objectives.next_token_weight=0 likewise
  decoder_init      our decoder initialised as open_clip's text tower (attention std width^-0.5,
                    residual projections / sqrt(2 layers), MLP (2 width)^-0.5, text_proj width^-0.5)
  vit_pos_std       our ViT's position embedding drawn with std width^-0.5 (open_clip) instead of 0.02
  vit_torch_init    our ViT's linear layers with PyTorch's default init (open_clip's) instead of timm's

Two probes of the first round became config keys: CLIP's pre-norm is model.image.pre_norm and
open_clip's whole ViT initialisation model.image.init=clip (both now defaults; =false / =timm
give timm's ViT back). The two ViT probes above change one part of timm's initialisation only.

The relations-corpus overrides of learning_vs_openclip.py come first, so a probe run is one line
of its ablation table, e.g.:

    python benchmarks/learning_probes.py open_clip_text run.name=probe objectives.next_token_weight=0
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import mmpretrain.encoders.image as image_module
from mmpretrain import model as model_module
from mmpretrain.decoder import Decoder

RELATIONS = ["model.modalities=[image]", "data.sources=[demo-relations]", "data.eval_sources=[demo-relations]",
             "train.eval_every=0", "train.checkpoint_every=0", "run.dir=runs/learning_probes"]


def after_init(cls, extra):
    """Run `extra(self, *args)` after `cls.__init__`."""
    init = cls.__init__

    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        extra(self, *args)
    cls.__init__ = wrapped


def open_clip_text():
    from open_clip.transformer import TextTransformer

    def add(self, cfg, vocab_size):
        self.probe_text = TextTransformer(context_length=cfg.text.context_length, vocab_size=vocab_size,
                                          width=cfg.decoder.width, heads=cfg.decoder.heads,
                                          layers=cfg.decoder.layers, output_dim=cfg.fusion.embed_dim)
    after_init(model_module.MultimodalModel, add)
    model_module.MultimodalModel.encode_text = lambda self, tokens, lengths: F.normalize(self.probe_text(tokens), dim=-1)
    forward = model_module.MultimodalModel.forward

    def patched(self, batch, layout):
        out = forward(self, batch, layout)
        out.embeddings["text"] = F.normalize(self.probe_text(batch.tokens), dim=-1)
        return out
    model_module.MultimodalModel.forward = patched


def open_clip_image():
    from open_clip.transformer import VisionTransformer

    def add(self, modality, cfg):
        c = cfg.image
        self.probe_vit = VisionTransformer(image_size=c.image_size, patch_size=c.patch_size, width=c.width,
                                           layers=c.depth, heads=c.heads, mlp_ratio=c.mlp_ratio,
                                           output_dim=cfg.fusion.embed_dim)
    after_init(model_module.MediaTower, add)

    def forward(self, x):
        tokens, _ = self.fusion(self.encoder(x))
        return tokens, F.normalize(self.probe_vit(x), dim=-1)
    model_module.MediaTower.forward = forward


def decoder_init():
    def init_weights(self):
        w, layers = self.cfg.width, self.cfg.layers
        nn.init.normal_(self.embed.weight, std=0.02)
        if self.caption_pos is not None:
            nn.init.normal_(self.caption_pos, std=0.01)
        for block in self.blocks:
            for lin in (block.q, block.k, block.v):
                nn.init.normal_(lin.weight, std=w ** -0.5)
            for lin in (block.mlp.gate, block.mlp.up):
                nn.init.normal_(lin.weight, std=(2 * w) ** -0.5)
            for lin in (block.proj, block.mlp.down):
                nn.init.normal_(lin.weight, std=w ** -0.5 * (2 * layers) ** -0.5)
    Decoder.init_weights = init_weights
    after_init(model_module.MultimodalModel,
               lambda self, cfg, _: nn.init.normal_(self.text_proj.weight, std=cfg.decoder.width ** -0.5))


def vit_pos_std():
    def redraw(self, cfg):
        with torch.no_grad():
            self.vit.pos_embed.normal_(std=cfg.width ** -0.5)
    after_init(image_module.ImageEncoder, redraw)


def vit_torch_init():
    def reset(self, cfg):
        for m in self.vit.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
    after_init(image_module.ImageEncoder, reset)


PROBES = {f.__name__: f for f in (open_clip_text, open_clip_image, decoder_init, vit_pos_std, vit_torch_init)}


def main() -> int:
    if len(sys.argv) < 2 or any(p not in PROBES for p in sys.argv[1].split(",")):
        print(__doc__, file=sys.stderr)
        return 2
    for name in sys.argv[1].split(","):
        PROBES[name]()
    from mmpretrain.train import main as train

    return train(["configs/text_image_audio.yaml", *RELATIONS, f"run.name={sys.argv[1]}", *sys.argv[2:]])


if __name__ == "__main__":
    sys.exit(main())
