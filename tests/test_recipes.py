"""The shipped recipes (configs/recipes/) run end to end on the demo corpus with small stand-in
checkpoints built here, and their frozen parts leave the run as they came in."""

import open_clip
import torch
from safetensors.torch import load_file

from mmpretrain import train
from mmpretrain.config import load_config

from conftest import ROOT, TINY
from test_hf_decoder import save_tokenizer
from test_vision_weights import _open_clip

SMALL_RUN = ["train.steps=2", "train.batch_size=16", "train.warmup_steps=0", "train.eval_every=0",
             "train.checkpoint_every=0", "train.progress=false", "train.device=cpu", "data.num_workers=0",
             "data.shuffle_buffer=50", "data.demo.variants_per_concept=1", "model.text.context_length=16"]


def _recipe(name, demo_cache, tmp_path, *overrides):
    return load_config(ROOT / "configs" / "recipes" / f"{name}.yaml",
                       SMALL_RUN + [f"data.demo.cache_dir={demo_cache}", f"run.dir={tmp_path / 'runs'}", *overrides])


def test_lit_locks_a_pretrained_image_tower(demo_cache, tmp_path):
    clip, path = _open_clip(tmp_path)
    cfg = _recipe("lit", demo_cache, tmp_path, f"model.image.pretrained={path}", "model.image.image_size=16",
                  "model.image.patch_size=4", "model.image.width=32", "model.image.depth=1", "model.image.heads=2",
                  "model.fusion.heads=2", "model.fusion.embed_dim=16", "model.decoder.width=32",
                  "model.decoder.layers=1", "model.decoder.heads=2")
    train.run(cfg)
    saved = load_file(cfg.run_dir / "export" / "model.safetensors")
    vit = "towers.image.encoder.vit."
    assert torch.equal(saved[vit + "blocks.0.mlp.fc1.weight"], clip.visual.transformer.resblocks[0].mlp.c_fc.weight)
    assert torch.equal(saved[vit + "norm_pre.weight"], clip.visual.ln_pre.weight)


def test_frozen_decoder_trains_encoders_into_a_pretrained_llm(demo_cache, tmp_path):
    import transformers

    tokenizer = save_tokenizer(tmp_path)
    torch.manual_seed(0)
    llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    llm.save_pretrained(tmp_path)
    towers = [o for o in TINY if not o.startswith("model.decoder.")]
    cfg = _recipe("frozen_decoder", demo_cache, tmp_path, *towers, f"model.decoder.pretrained={tmp_path}",
                  f"model.text.tokenizer=hf:{tmp_path}", "model.audio.clip_seconds=0.5", "model.audio.n_mels=32",
                  "model.fusion.num_latents=2", "objectives.next_token_max_samples=4")
    train.run(cfg)
    export = cfg.run_dir / "export"
    saved = load_file(export / "model.safetensors")
    assert torch.equal(saved["decoder.embed.weight"], llm.model.embed_tokens.weight)
    assert torch.equal(saved["decoder.blocks.0.mlp.down.weight"], llm.model.layers[0].mlp.down_proj.weight)
    import yaml

    from mmpretrain import load_pretrained  # the export carries its tokenizer, read from there

    exported = yaml.safe_load((export / "config.yaml").read_text())["model"]
    assert exported["text"]["tokenizer"] == "hf:tokenizer" and exported["decoder"]["pretrained"] == ""
    assert (export / "tokenizer" / "tokenizer.json").is_file()

    pretrained = load_pretrained(export)
    assert pretrained.tokenizer.vocab_size == len(tokenizer)
    assert pretrained.encode_text(["a red circle"]).shape == (1, 16)
