"""Mixture-of-experts decoder layers (mmpretrain/moe.py): parity with a dense reference that loops
over experts, routing and balancing rules, counts under activation checkpointing, the config's
refusals, and the training entry point (one process and FSDP2 on two)."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_same_run, run_until_crash, small_eval_shard
from mmpretrain import train
from mmpretrain.config import ConfigError, DecoderConfig, MoEConfig, load_config
from mmpretrain.decoder import Decoder
from mmpretrain.moe import MoE, balance, moe_layers
from mmpretrain.packing import Packing
from test_distributed import _torchrun
from test_train import read_metrics

ROOT_CFG = "configs/tiny.yaml"


def dense_reference(x, layer: MoE):
    """Every expert over every token in float64, then each token's chosen experts combined: the
    definition, with no sorting or grouping."""
    x64 = x.double()
    probs = (x64 @ layer.router.weight.double().t()).softmax(-1)
    chosen = (probs + layer.expert_bias.double()).topk(layer.top_k, dim=-1).indices
    weights = probs.gather(1, chosen)
    if layer.top_k > 1:
        weights = weights / weights.sum(-1, keepdim=True)
    outs = []
    for e in range(layer.experts):
        gate, up = (x64 @ layer.gate_up[e].double()).chunk(2, dim=-1)
        outs.append((F.silu(gate) * up) @ layer.down[e].double())
    outs = torch.stack(outs, dim=1)  # (T, E, C)
    return (weights[..., None] * outs.gather(1, chosen[..., None].expand(-1, -1, x.shape[1]))).sum(1)


def _layer(width, hidden, experts, top_k, seed=0, **cfg):
    torch.manual_seed(seed)
    layer = MoE(width, hidden, MoEConfig(experts=experts, top_k=top_k, **cfg))
    layer.init_weights(0.5, 0.5)  # large enough that the experts differ visibly
    return layer


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("width,hidden", [(16, 8), (6, 5)])  # grouped kernel; the per-expert loop
def test_moe_equals_the_dense_reference_with_every_gradient(top_k, width, hidden):
    layer = _layer(width, hidden, experts=4, top_k=top_k)
    with torch.no_grad():
        layer.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))  # moves choices, not weights
    x = torch.randn(37, width, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    got = layer(x)
    params = [layer.router.weight, layer.gate_up, layer.down]
    ref_params = [p.detach().double().requires_grad_() for p in params]
    ref_layer = _layer(width, hidden, experts=4, top_k=top_k)
    with torch.no_grad():
        ref_layer.expert_bias.copy_(layer.expert_bias)
    ref_layer.router.weight, ref_layer.gate_up, ref_layer.down = (torch.nn.Parameter(p) for p in ref_params)
    want = dense_reference(x64, ref_layer)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(want)
    got.backward(g.float())
    want.backward(g)
    for mine, ref in zip([x, *params], [x64, *[ref_layer.router.weight, ref_layer.gate_up, ref_layer.down]]):
        torch.testing.assert_close(mine.grad.double(), ref.grad, rtol=1e-4, atol=1e-6)
    assert layer.router.weight.grad.abs().sum() > 0  # top-1 included: its weight is the probability


def test_the_bias_moves_the_choice_and_balancing_moves_the_bias_towards_even_load():
    layer = _layer(8, 4, experts=4, top_k=2, bias_rate=0.01)
    x = torch.randn(64, 8)
    with torch.no_grad():
        layer.expert_bias.copy_(torch.tensor([10.0, 0.0, 0.0, 0.0]))
    chosen, weights, probs = layer.route(x)
    assert (chosen == 0).any(dim=1).all()  # expert 0 is in every token's pair
    torch.testing.assert_close(weights.sum(1), torch.ones(64))  # weights from the probabilities alone
    layer.train()
    layer(x)
    assert int(layer.routed.sum()) == 64 * 2 and int(layer.routed[0]) == 64
    before = layer.expert_bias.clone()
    stats = balance(layer)
    delta = layer.expert_bias - before
    assert delta[0] < 0 and abs(float(delta.sum())) < 1e-6  # the busy expert down, the mean kept
    assert float(stats["moe/max_load"]) == pytest.approx(64 / 128 * 4)
    assert int(layer.routed.sum()) == 0  # taken
    layer.eval()
    layer(x)
    assert int(layer.routed.sum()) == 0  # evaluation never counts


def test_aux_loss_is_switch_and_reaches_the_router():
    layer = _layer(8, 4, experts=4, top_k=1, balance="aux")
    layer.train()
    x = torch.randn(50, 8)
    layer(x)
    (aux,) = layer.aux_losses
    probs = (x @ layer.router.weight.t()).softmax(-1)
    share = torch.bincount(probs.argmax(-1), minlength=4).float() / 50
    torch.testing.assert_close(aux, 4 * (share * probs.mean(0)).sum())
    aux.backward()
    assert layer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_counts_each_token_once(mode):
    from mmpretrain.parallel.activation_checkpointing import apply_activation_checkpointing

    cfg = DecoderConfig(width=16, layers=3, heads=2, moe=MoEConfig(experts=4, top_k=2, every=2))
    torch.manual_seed(0)
    plain = Decoder(cfg, vocab_size=50, backend="sdpa")
    wrapped = Decoder(cfg, vocab_size=50, backend="sdpa")
    wrapped.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(wrapped, mode)
    assert [type(b.mlp).__name__ for b in plain.blocks] == ["SwiGLU", "MoE", "SwiGLU"]  # every 2nd
    packing = Packing.from_lengths([5, 7, 1, 11], device="cpu")
    x = torch.randn(24, 16)
    outs = []
    for dec in (plain, wrapped):
        dec.train()
        xi = x.clone().requires_grad_()
        dec(xi, packing).square().sum().backward()
        outs.append(xi.grad)
        (layer,) = moe_layers(dec)
        assert int(layer.routed.sum()) == 24 * 2  # not again in the recompute
    torch.testing.assert_close(outs[0], outs[1])


def test_config_refuses_what_cannot_work(tmp_path):
    for overrides, words in ((["model.decoder.moe.experts=1"], "experts: 1"),
                             (["model.decoder.moe.experts=2", "model.decoder.moe.top_k=3"], "top_k: 3"),
                             (["model.decoder.moe.experts=4", f"model.decoder.pretrained={tmp_path}"], "dense checkpoint")):
        with pytest.raises(ConfigError, match=words):
            load_config(ROOT_CFG, overrides)


@pytest.mark.parametrize("balance_mode", ["bias", "aux"])
def test_training_logs_the_load_and_resumes_with_the_bias(tiny_cfg, balance_mode, tmp_path):
    steps = ["model.decoder.moe.experts=4", f"model.decoder.moe.balance={balance_mode}", "train.steps=4",
             "train.checkpoint_every=2", "model.decoder.layers=2", "model.decoder.moe.every=2",
             f"data.eval_sources=[{small_eval_shard(tmp_path)}]"]  # the final evaluations: unchecked here
    whole = tiny_cfg(*steps, "run.name=whole")
    train.run(whole)
    metrics = read_metrics(whole.run_dir)
    assert all(m["moe/max_load"] >= 1.0 >= m["moe/min_load"] for m in metrics)
    assert ("moe/aux" in metrics[0]) == (balance_mode == "aux")
    cut = tiny_cfg(*steps, "run.name=cut")
    run_until_crash(cut, after_step=3)
    train.run(cut)
    keep = lambda ms: [{k: m[k] for k in ("step", "loss", "grad_norm", "moe/max_load", "moe/min_load")}  # noqa: E731
                       for m in ms]
    assert_same_run(keep(read_metrics(cut.run_dir)), keep(metrics))  # the bias came back with the checkpoint


def test_fsdp2_with_activation_checkpointing_trains_a_moe_decoder(demo_cache, tmp_path):
    """Two ranks, FSDP2 sharding the experts, blocks checkpointed: the loads are summed over both
    ranks before the bias moves, so both keep the same bias (the export has it, centred)."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "runs" / "moe"
    stderr, metrics = _torchrun(2, "tiny.yaml", demo_cache, run_dir, "train.steps=2", "train.log_every=1",
                                "parallel.dp_shard=fsdp", "parallel.activation_checkpointing=full",
                                "model.decoder.moe.experts=4", "model.decoder.moe.bias_rate=0.1")
    assert "FSDP2: " in stderr and [m["step"] for m in metrics] == [1, 2]
    assert all(m["moe/max_load"] >= 1.0 for m in metrics)
    bias = load_file(run_dir / "export" / "model.safetensors")["decoder.blocks.0.mlp.expert_bias"]
    assert bias.shape == (4,) and abs(float(bias.sum())) < 1e-5  # centred: moves never shift the mean
    assert json.loads((run_dir / "eval" / "retrieval.json").read_text())["text->image"]["n"] == 100
