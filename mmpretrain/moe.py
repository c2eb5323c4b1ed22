"""Mixture-of-experts MLP for the decoder: token-choice top-k routing over SwiGLU experts.

    scores = softmax(x W_router)             (fp32, whatever the autocast)
    chosen = top_k(scores + expert_bias)      (the bias moves the choice only, never the weights)
    y      = sum over chosen e of w_e * SwiGLU_e(x),  w = scores[chosen] (renormalised when top_k > 1)

Tokens are sorted by expert and each expert's rows run as one group of `torch._grouped_mm` (one
kernel for every expert, its backward included) where torch has it for the device and the widths
meet its 16-byte stride rule; otherwise one matmul per expert over its sorted rows. No capacity
limit: every token reaches its experts (none dropped), so the output never depends on the batch.

Load balancing (MoEConfig.balance): `bias` is DeepSeek-V3's auxiliary-loss-free rule as
torchtitan applies it: after each optimizer step every expert's bias moves by `bias_rate` towards
the mean load (the sign of mean - load, centred), outside autograd, from the tokens routed in
that step on every rank; `aux` is the Switch Transformer's loss E * sum_e f_e * P_e (f: share of
routed tokens, P: mean router probability), added to the training loss with `aux_weight`.

Routed-token counts are taken in training forwards only, and not again when activation
checkpointing recomputes a block in backward (so a step counts each token once).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mmpretrain.config import MoEConfig


def _in_backward() -> bool:
    """True while autograd runs a backward pass: where activation checkpointing recomputes a
    forward (torch.utils.checkpoint asks the same private hook for the same reason)."""
    return torch._C._current_graph_task_id() != -1


def _grouped_mm_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._grouped_mm needs row strides that are multiples of 16 bytes on both operands."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    step = 16 // x.element_size()
    return x.shape[-1] % step == 0 and w.shape[-1] % step == 0


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, counts_list: list[int]) -> torch.Tensor:
    """Rows of `x` (sorted by group, `counts` rows per group) times their group's (K, N) matrix of
    `w` (G, K, N) -> (rows, N). One grouped kernel where torch has one for these shapes, else a
    matmul per group (rows of an empty group cost nothing either way)."""
    if _grouped_mm_fits(x, w):
        w = w.to(x.dtype)  # autocast does not cover _grouped_mm
        return torch._grouped_mm(x, w, offs=counts.cumsum(0).to(torch.int32))
    return torch.cat([part @ w[e].to(part.dtype) for e, part in enumerate(x.split(counts_list))])


class MoE(nn.Module):
    """A drop-in for the decoder block's SwiGLU: (T, C) -> (T, C)."""

    def __init__(self, width: int, hidden: int, cfg: MoEConfig):
        super().__init__()
        self.cfg, self.experts, self.top_k, self.hidden = cfg, cfg.experts, cfg.top_k, hidden
        self.router = nn.Linear(width, cfg.experts, bias=False)
        self.gate_up = nn.Parameter(torch.empty(cfg.experts, width, 2 * hidden))
        self.down = nn.Parameter(torch.empty(cfg.experts, hidden, width))
        # persistent: a resumed run chooses as the uninterrupted one would
        self.register_buffer("expert_bias", torch.zeros(cfg.experts))
        # routed tokens per expert since the last balancing update (training forwards only)
        self.register_buffer("routed", torch.zeros(cfg.experts), persistent=False)
        self.aux_losses: list[torch.Tensor] = []  # this forward's Switch losses, taken by the task

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (experts (T, k), their weights (T, k) in fp32, router probabilities (T, E) in fp32)."""
        probs = F.linear(x.float(), self.router.weight.float()).softmax(dim=-1)
        chosen = (probs + self.expert_bias).topk(self.top_k, dim=-1).indices
        weights = probs.gather(1, chosen)
        if self.top_k > 1:  # Mixtral's renormalisation; a top-1 weight stays the probability, so
            weights = weights / weights.sum(dim=-1, keepdim=True)  # the router keeps a gradient
        return chosen, weights, probs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, c = x.shape
        chosen, weights, probs = self.route(x)
        flat = chosen.flatten()  # (T * k): token i's choices at i*k .. i*k + k-1
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.experts)
        token = order // self.top_k
        rows = x[token]  # (T * k, C), grouped by expert
        counts_list = counts.tolist()
        gate, up = grouped_matmul(rows, self.gate_up, counts, counts_list).chunk(2, dim=-1)
        out = grouped_matmul(F.silu(gate) * up, self.down, counts, counts_list)
        out = out * weights.flatten()[order, None].to(out.dtype)
        y = torch.zeros_like(x).index_add_(0, token, out.to(x.dtype))
        if self.training and not _in_backward():
            with torch.no_grad():
                self.routed += counts.to(self.routed.dtype)
            if self.cfg.balance == "aux":
                share = counts.float() / max(t * self.top_k, 1)
                self.aux_losses.append(self.experts * (share * probs.mean(dim=0)).sum())
        return y

    @torch.no_grad()
    def balance(self, group=None) -> dict[str, torch.Tensor]:
        """After an optimizer step: the step's routed tokens summed over every rank of `group`,
        the bias update (balance=bias), and the load statistics for the log: `max_load` and
        `min_load`, the busiest and idlest expert's share of the routed tokens times E (1.0 each
        when even)."""
        routed = self.routed.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(routed, group=group)
        self.routed.zero_()
        total = routed.sum()
        if not total:
            return {}
        if self.cfg.balance == "bias":
            delta = self.cfg.bias_rate * torch.sign(routed.mean() - routed)
            self.expert_bias += delta - delta.mean()
        load = routed * self.experts / total
        return {"max_load": load.max(), "min_load": load.min()}

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.router.weight, std=std)
        nn.init.normal_(self.gate_up, std=std)
        nn.init.normal_(self.down, std=out_std)
        self.expert_bias.zero_()
        self.routed.zero_()


def moe_layers(module: nn.Module) -> list[MoE]:
    return [m for m in module.modules() if isinstance(m, MoE)]


def take_aux_loss(module: nn.Module) -> torch.Tensor | None:
    """The Switch losses of `module`'s MoE layers from the forward just run (mean over layers),
    or None; each layer's list is emptied."""
    losses = []
    for m in moe_layers(module):
        losses += m.aux_losses
        m.aux_losses = []
    return torch.stack(losses).mean() if losses else None


def discard_counts(module: nn.Module) -> None:
    """A skipped step's routed tokens: forgotten, so they do not move the balancing bias."""
    for m in moe_layers(module):
        m.routed.zero_()


def balance(module: nn.Module, group=None) -> dict[str, torch.Tensor]:
    """Every MoE layer's `balance` after an optimizer step -> the log's `moe/max_load` and
    `moe/min_load` (the extremes over layers)."""
    stats = [s for m in moe_layers(module) if (s := m.balance(group))]
    if not stats:
        return {}
    return {"moe/max_load": torch.stack([s["max_load"] for s in stats]).max(),
            "moe/min_load": torch.stack([s["min_load"] for s in stats]).min()}
