"""The one recipe for what trains: the task (model + objectives + row layout), its parallel
wrapper, optimizer and schedule (`build`), and one optimizer step on them (`train_step`).
The trainer, the tests and the benchmarks all build and step through here."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.nn as nn

from mmpretrain import moe, parallel
from mmpretrain.config import Config, TrainConfig, masked_modalities
from mmpretrain.model import MultimodalModel
from mmpretrain.objectives import Objectives, PretrainingTask
from mmpretrain.optim import build_optimizer, build_scheduler
from mmpretrain.packing import RowLayout
from mmpretrain.tokenizer import Tokenizer

log = logging.getLogger("mmpretrain")


def build_task(cfg: Config, vocab_size: int, gather_group=None) -> PretrainingTask:
    """Model, objectives and row layout in one module, on the default device. `gather_group`: the
    data-parallel group the contrastive loss gathers over (None: this process alone)."""
    model = MultimodalModel(cfg.model, vocab_size)
    masked = masked_modalities(cfg.model) if cfg.objectives.masked_weight else []
    objectives = Objectives(model.modalities, cfg.objectives, gather_group,
                            {m: model.towers[m].encoder for m in masked})
    return PretrainingTask(model, objectives, RowLayout.from_config(cfg))


@dataclass
class Built:
    tokenizer: Tokenizer
    task: PretrainingTask  # holds the parameters: what the optimizer, clipping and checkpoints see
    wrapped: nn.Module  # what computes the loss: DDP or FSDP2 around `task`, or `task` itself
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    autocast: torch.autocast  # bf16 autocast, enabled when `bf16`
    bf16: bool


def build(cfg: Config, env: parallel.DistEnv, device: torch.device,
          tokenizer: Tokenizer | None = None) -> Built:
    """Everything a run trains, seeded with run.seed, on `device`. `tokenizer`: the caller's, when
    it made one already (one is made otherwise)."""
    tokenizer = tokenizer or Tokenizer(cfg.model.text)
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    sharded = parallel.sharded(env, cfg.parallel)
    torch.manual_seed(cfg.run.seed)
    # FSDP2: built on the meta device (no memory), sharded, then allocated shard by shard
    with torch.device("meta") if sharded else contextlib.nullcontext():
        task = build_task(cfg, tokenizer.vocab_size, env.gather_group)
    if cfg.train.freeze:  # before any wrapper: DDP and FSDP2 see which parameters take gradients
        task.model.freeze(cfg.train.freeze)
    log.info("parameters: %s", parameter_table(task.model))
    if not sharded:
        task.to(device)
    wrapped = parallel.parallelize(task, env, cfg.parallel, device.type, bf16, bool(unused_parameter_keys(cfg)))
    if sharded:
        from mmpretrain.parallel.fsdp import materialize

        materialize(task, device, seed=cfg.run.seed + env.rank)
        if env.tp > 1:
            from mmpretrain.parallel.fsdp import sync_over_tp

            sync_over_tp(task, env)
    load_pretrained_parts(task.model, cfg)
    if cfg.objectives.distill.teacher:  # frozen, outside the task's parameters
        from mmpretrain.objectives.distill import make_teacher

        task.objectives.set_teacher(make_teacher(cfg, device))
    optimizer = build_optimizer(task, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    return Built(tokenizer, task, wrapped, optimizer, scheduler, autocast, bf16)


def unused_parameter_keys(cfg: Config) -> list[str]:
    """The settings under which some trainable parameter may get no gradient in a step ([]: every
    one gets one in every step, on every rank), for DDP's find_unused_parameters: data whose
    samples may lack a modality (its tower, its pairs' temperatures), an objective left out (the
    heads only it uses), masked modelling (its decoders rest in the unmasked phase), experts (one
    may be routed no token)."""
    from mmpretrain.data.sources import FULLY_PAIRED

    paired = all(set(cfg.model.modalities) <= set(FULLY_PAIRED.get(s.pattern, ())) for s in cfg.data.sources
                 if s.weight > 0)
    o = cfg.objectives
    causes = {"data.sources": not paired, "objectives.contrastive_weight": not o.contrastive_weight,
              "objectives.next_token_weight": not o.next_token_weight, "objectives.masked_weight": o.masked_weight,
              "model.decoder.moe.experts": cfg.model.decoder.moe.experts}
    return [key for key, cause in causes.items() if cause]


def load_pretrained_parts(model: MultimodalModel, cfg: Config) -> None:
    """The checkpoints the config names, over the built (and sharded) model: the decoder's (a
    Hugging Face folder), then each tower's; towers that start from another tower (video from
    image) copy it again once it holds its checkpoint's weights."""
    from mmpretrain.encoders import MODALITIES

    if cfg.model.decoder.pretrained:
        from mmpretrain.hf import load_decoder

        log.info("%s", load_decoder(model.decoder, cfg.model.decoder.pretrained))
    files = {m: getattr(MODALITIES[m].section(cfg.model), "pretrained", "") for m in model.modalities}
    loaded = False
    for m, file in files.items():
        if file and MODALITIES[m].load_pretrained is not None and MODALITIES[m].init_from is None:
            log.info("%s", MODALITIES[m].load_pretrained(model.towers[m].encoder, file, f"model.{m}.pretrained"))
            loaded = True
    if loaded:
        model.init_from_towers()
    for m, file in files.items():
        if file and MODALITIES[m].load_pretrained is not None and MODALITIES[m].init_from is not None:
            log.info("%s", MODALITIES[m].load_pretrained(model.towers[m].encoder, file, f"model.{m}.pretrained"))
    frozen = [p for p in cfg.train.freeze if p != "text_proj" and not (files.get(p) or p == "decoder"
                                                                      and cfg.model.decoder.pretrained)]
    if frozen and not cfg.train.init_from:
        log.warning("train.freeze: %s start from random weights (no model.<part>.pretrained, no train.init_from) "
                    "and stay so", ", ".join(frozen))


def parameter_table(model: MultimodalModel) -> str:
    """Trainable and frozen parameters per part, for the log."""
    def count(modules, frozen: bool) -> int:
        return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad != frozen)

    def size(n: int) -> str:
        return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n / 1e3:.1f}k"

    cells = []
    for name, modules in model.parts().items():
        trained, frozen = count(modules, False), count(modules, True)
        cells.append(f"{name} {size(trained)}" + (f" (+{size(frozen)} frozen)" if frozen else ""))
    return ", ".join(cells)


class NonFiniteLoss(FloatingPointError):
    """A loss turned NaN or infinite under train.nan_policy=stop; its message is the user's line."""


def _nonfinite(bad: dict[str, float], step: int, cfg: TrainConfig, lr: float) -> str:
    """Which terms went non-finite at which step, and the setting that likely made them."""
    where = f"non-finite loss at step {step + 1} in {', '.join(f'{k} ({v})' for k, v in bad.items())}"
    if step == 0:  # no update yet: the inputs or the initial weights, whatever the learning rate
        cause = "before any update, so from the data or the model's initial weights, not train.lr"
    else:
        clip = "" if cfg.grad_clip else ", or clip gradients (train.grad_clip=1.0)"
        cause = (f"the weights diverged: likely train.lr={cfg.lr:g} is too high (the rate was {lr:.3g} at this "
                 f"step); lower it or lengthen train.warmup_steps{clip}")
    return f"{where}: {cause}; train.nan_policy=skip skips such steps instead"


def train_step(task: PretrainingTask, wrapped: nn.Module, optimizer, scheduler, autocast, batches,
               cfg: TrainConfig, step: int = 0) -> dict[str, float]:
    """One optimizer step of `build`'s objects over cfg.grad_accum micro-batches drawn from
    `batches` (an iterator of batches on the device) -> logged values, averaged over the ranks; {}
    when a non-finite loss was skipped (nan_policy=skip). `step`: the steps done before this one
    (for messages)."""
    sums: dict[str, torch.Tensor] = {}
    if cfg.token_dropout_until and step >= cfg.token_dropout_until:
        task.model.end_token_dropout()  # the unmasked phase (also after a resume past its start)
    for _ in range(cfg.grad_accum):
        batch = next(batches)
        with autocast:
            loss, terms = wrapped(batch)
        if parallel.any_rank(~torch.isfinite(loss.detach())):  # every rank takes the same branch
            bad = {k: float(v) for k, v in terms.items() if not torch.isfinite(v)} or {"total": float(loss)}
            if cfg.nan_policy == "stop":
                raise NonFiniteLoss(_nonfinite(bad, step, cfg, scheduler.get_last_lr()[0]))
            optimizer.zero_grad(set_to_none=True)
            moe.discard_counts(task.model.decoder)
            log.warning("step %d: non-finite loss in %s, skipped", step + 1, ", ".join(bad))
            return {}
        (loss / cfg.grad_accum).backward()
        counts = torch.tensor([float(batch.row_tokens), float(len(batch))], device=loss.device)
        stats = {"loss": loss.detach(), **terms, "tokens": counts[0], "samples": counts[1]}
        if batch.row_budget:
            stats["packing_efficiency"] = stats["tokens"] / batch.row_budget
        for k, v in stats.items():
            sums[k] = sums.get(k, 0) + v / cfg.grad_accum
    if cfg.grad_clip > 0:  # over sharded gradients too (DTensor norms under FSDP2 and tp)
        sums["grad_norm"] = parallel.clip_grad_norm(task.parameters(), cfg.grad_clip)
    optimizer.step()
    task.objectives.clamp_()
    sums.update(moe.balance(task.model.decoder))  # the routed tokens of every rank: the same on each
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return {k: float(parallel.all_reduce_mean(v.float())) for k, v in sums.items()}
