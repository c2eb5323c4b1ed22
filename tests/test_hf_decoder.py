"""Hugging Face Llama-family checkpoints as the decoder: tiny models built with `transformers`
and saved to a folder give the same logits through our decoder, on packed rows too."""

import json
import re

import pytest
import torch
import transformers
import yaml

from mmpretrain.config import ConfigError, load_config
from mmpretrain.decoder import Decoder
from mmpretrain.hf import load_decoder
from mmpretrain.packing import Packing
from mmpretrain.train import main

from conftest import ROOT, TINY

TOWERS = [o for o in TINY if not o.startswith("model.decoder.")]  # the decoder's sizes: the checkpoint's

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
             rms_norm_eps=1e-6, max_position_embeddings=256)
MODELS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=4, tie_word_embeddings=True),
    "llama-gqa-untied": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=False,
                                                         head_dim=16),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=False),
    "mistral": lambda: transformers.MistralConfig(**SMALL, num_key_value_heads=1, sliding_window=None),
    "llama3-rope": lambda: transformers.LlamaConfig(
        **SMALL, num_key_value_heads=2, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        rope_theta=500000.0),
}


def save_model(kind: str, folder):
    torch.manual_seed(0)
    hf_cfg = MODELS[kind]()
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    if kind == "qwen2":  # its q/k/v biases start at zero: make them count
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.mark.parametrize("kind", list(MODELS))
def test_a_checkpoint_gives_its_own_logits_through_our_decoder_on_a_packed_row(kind, tmp_path):
    reference = save_model(kind, tmp_path)
    cfg = load_config(None, TOWERS + [f"model.decoder.pretrained={tmp_path}"]).model.decoder
    assert (cfg.width, cfg.layers, cfg.heads, cfg.vocab_size) == (32, 2, 4, 97)
    decoder = Decoder(cfg, cfg.vocab_size).eval()
    assert "decoder: " in load_decoder(decoder, tmp_path)
    g = torch.Generator().manual_seed(1)
    lengths = [5, 40, 1, 23]  # several sequences end to end, one longer than the rope's original context
    ids = [torch.randint(0, 97, (n,), generator=g) for n in lengths]
    with torch.no_grad():
        h = decoder(decoder.embed(torch.cat(ids)), Packing.from_lengths(lengths))
        ours = h @ decoder.output_weight.T
        theirs = torch.cat([reference(x[None]).logits[0] for x in ids])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_fields_come_from_the_checkpoint_and_a_disagreeing_field_is_named(tmp_path):
    save_model("qwen2", tmp_path)
    cfg = load_config(None, TOWERS + [f"model.decoder.pretrained={tmp_path}"]).model.decoder
    assert (cfg.kv_heads, cfg.mlp_hidden, cfg.qkv_bias, cfg.tie_embeddings) == (2, 56, True, False)
    load_config(None, TOWERS + [f"model.decoder.pretrained={tmp_path}", "model.decoder.width=32"])  # agrees
    with pytest.raises(ConfigError, match=r"model.decoder: layers=3 \(the checkpoint's: 2\)"):
        load_config(None, TOWERS + [f"model.decoder.pretrained={tmp_path}", "model.decoder.layers=3"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="'.*empty' has no config.json"):
        load_config(None, TOWERS + [f"model.decoder.pretrained={tmp_path / 'empty'}"])
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="model_type 'gpt2'"):
        load_config(None, TOWERS + [f"model.decoder.pretrained={tmp_path}"])


def test_the_checkpoint_replaces_the_config_files_sizes_and_only_the_command_line_must_agree(tmp_path, capsys):
    """configs/tiny.yaml's decoder (width 32, 1 layer, 2 heads) gives way to the checkpoint's (2
    layers, 4 heads), as --print-config shows; a size on the command line must agree with it."""
    save_model("llama", tmp_path)
    tiny, pretrained = ROOT / "configs" / "tiny.yaml", f"model.decoder.pretrained={tmp_path}"
    assert main([str(tiny), pretrained, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["decoder"]
    assert (printed["width"], printed["layers"], printed["heads"], printed["vocab_size"]) == (32, 2, 4, 97)
    assert load_config(tiny, [pretrained, "model.decoder.layers=2"]).model.decoder.layers == 2  # agrees
    with pytest.raises(ConfigError, match=r"model.decoder: layers=1 \(the checkpoint's: 2\)"):
        load_config(tiny, [pretrained, "model.decoder.layers=1"])


def test_missing_weights_and_unknown_names_are_reported_before_any_model_is_built(tmp_path):
    save_model("llama", tmp_path / "llm").save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    (tmp_path / "llm" / "model.safetensors").unlink()  # config.json alone
    with pytest.raises(ConfigError, match="has neither model.safetensors nor model.safetensors.index.json"):
        load_config(None, TOWERS + [f"model.decoder.pretrained={tmp_path / 'llm'}"])
    next((tmp_path / "sharded").glob("model-*.safetensors")).unlink()
    with pytest.raises(ConfigError, match=r"lacks 1 of the files its model.safetensors.index.json names"):
        load_config(None, TOWERS + [f"model.decoder.pretrained={tmp_path / 'sharded'}"])
    with pytest.raises(ConfigError, match=r"'nowhere/llm' not found: tried .*nowhere/llm and the Hugging Face cache"):
        load_config(None, TOWERS + ["model.decoder.pretrained=nowhere/llm"])


def test_a_repo_id_resolves_from_the_local_hugging_face_cache(tmp_path, monkeypatch):
    """A snapshot in HF_HOME's cache as huggingface_hub lays it out (refs/main names the snapshot);
    found by huggingface_hub's cache lookup, without the network."""
    import huggingface_hub.constants

    repo = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-llama"
    save_model("llama", repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HOME once, when it is imported (here, already): its cache path too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    cfg = load_config(None, TOWERS + ["model.decoder.pretrained=tiny-org/tiny-llama"]).model.decoder
    assert (cfg.layers, cfg.heads, cfg.pretrained) == (2, 4, "tiny-org/tiny-llama")
    assert str(repo / "snapshots") in load_decoder(Decoder(cfg, cfg.vocab_size), cfg.pretrained)
    with pytest.raises(ConfigError, match=r"'tiny-org/other' not found: tried .* and the Hugging Face cache " +
                       re.escape(str(tmp_path / "hf" / "hub"))):
        load_config(None, TOWERS + ["model.decoder.pretrained=tiny-org/other"])


def test_a_shape_that_does_not_fit_is_named(tmp_path):
    save_model("llama", tmp_path)
    cfg = load_config(None, TOWERS + [f"model.decoder.pretrained={tmp_path}"]).model.decoder
    import dataclasses

    narrow = Decoder(dataclasses.replace(cfg, mlp_hidden=48), cfg.vocab_size)
    with pytest.raises(ConfigError, match=r"gate_proj.weight \(56, 32\) do not fit the decoder.s \(48, 32\)"):
        load_decoder(narrow, tmp_path)


def save_tokenizer(folder, bos: bool = True):
    """A small BPE tokenizer trained here, saved by transformers as a model's tokenizer is."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok.train_from_iterator(["a red circle left of a blue cross", "two green squares above a yellow star"] * 20,
                            trainers.BpeTrainer(vocab_size=97, special_tokens=specials,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>",
                                                pad_token="<pad>", **({"bos_token": "<s>"} if bos else {}))
    fast.save_pretrained(folder)
    return fast


@pytest.mark.parametrize("bos", [True, False], ids=["bos", "no-bos"])
def test_a_hugging_face_tokenizer_gives_transformers_ids_between_its_bos_and_eos(tmp_path, bos):
    from mmpretrain.config import TextConfig
    from mmpretrain.tokenizer import Tokenizer

    theirs = save_tokenizer(tmp_path, bos)
    ours = Tokenizer(TextConfig(tokenizer=f"hf:{tmp_path}", context_length=100))
    texts = ["a red circle left of a blue cross", "Two  green squares, above a star!"]
    tokens, lengths = ours(texts)
    first = theirs.bos_token_id if bos else theirs.eos_token_id  # no BOS: EOS begins a caption
    for row, n, text in zip(tokens, lengths, texts):
        assert row[:n].tolist() == [first, *theirs(text, add_special_tokens=False)["input_ids"], theirs.eos_token_id]
        assert (row[n:] == theirs.pad_token_id).all()
    assert ours.vocab_size == len(theirs) and ours.decode(tokens[0]) == texts[0]
    short = Tokenizer(TextConfig(tokenizer=f"hf:{tmp_path}", context_length=5))(texts)[0]
    assert short[:, -1].tolist() == [theirs.eos_token_id] * 2  # truncated, keeping eot


def test_the_tokenizer_key_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="expected openclip or hf:<folder>"):
        load_config(None, ["model.text.tokenizer=sentencepiece"])
    with pytest.raises(ConfigError, match="has no tokenizer.json"):
        load_config(None, [f"model.text.tokenizer=hf:{tmp_path}"])
    with pytest.raises(ConfigError, match="past open_clip's tokenizer's 77 tokens"):
        load_config(None, ["model.text.context_length=100"])
    save_tokenizer(tmp_path)
    assert load_config(None, [f"model.text.tokenizer=hf:{tmp_path}", "model.text.context_length=512"])


def test_sharded_bf16_weights_load_tensor_by_tensor(tmp_path):
    """A checkpoint in several safetensors files (an index names them) and in bf16: each tensor is
    cast as it is copied; the logits are the bf16 model's, computed in fp32."""
    reference = save_model("llama-gqa-untied", tmp_path / "full")
    reference.to(torch.bfloat16).save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    cfg = load_config(None, TOWERS + [f"model.decoder.pretrained={tmp_path / 'sharded'}"]).model.decoder
    decoder = Decoder(cfg, cfg.vocab_size).eval()
    assert "(bfloat16)" in load_decoder(decoder, tmp_path / "sharded")
    assert decoder.embed.weight.dtype == torch.float32
    ids = torch.randint(0, 97, (12,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = decoder(decoder.embed(ids), Packing.from_lengths([12])) @ decoder.output_weight.T
        theirs = reference.float()(ids[None]).logits[0]  # the bf16 weights, back in fp32
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
