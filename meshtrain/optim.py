"""AdamW, the learning-rate schedule, and gradient clipping by the global norm over every axis.

The global norm is one world-wide all-reduce of weighted local squares: a parameter held by k
ranks (replicated over dp or tp) counts 1/k from each, a tied copy on another stage counts 0.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.optim import AdamW
from torch.optim.lr_scheduler import LambdaLR

from meshtrain.config import TrainSection


def build_optimizer(params: list[torch.nn.Parameter], train: TrainSection) -> AdamW:
    """AdamW with weight decay on matrices only. DTensor and plain parameters go in separate
    groups: the foreach/fused kernels fail on a group that mixes them."""
    groups: dict[tuple[bool, bool], list] = {}
    for p in params:
        groups.setdefault((isinstance(p, DTensor), p.ndim >= 2), []).append(p)
    # fused: one kernel per group and no foreach temporaries (a full copy of the parameters
    # each), which were gigabytes of peak memory in the 8-worker reference run.
    return AdamW(
        [
            {"params": ps, "weight_decay": train.weight_decay if decay else 0.0}
            for (_, decay), ps in sorted(groups.items())
        ],
        lr=train.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=True,
    )


def build_lr_schedule(optimizer: AdamW, train: TrainSection) -> LambdaLR:
    """Linear warmup to train.lr, then cosine decay to train.lr * train.min_lr_ratio."""
    warmup, total, floor = train.warmup_steps, train.steps, train.min_lr_ratio

    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def local_grad(p: torch.Tensor) -> torch.Tensor | None:
    g = p.grad
    return g.to_local() if isinstance(g, DTensor) else g


def weighted_square_norm(params: list, weights: list[float]) -> torch.Tensor:
    """This rank's share of the squared global gradient norm (fp64, a 0-d tensor)."""
    squares = [
        w * local_grad(p).detach().double().square().sum()
        for p, w in zip(params, weights, strict=True)
        if w and p.grad is not None
    ]
    return torch.stack(squares).sum() if squares else torch.zeros((), dtype=torch.float64)


def clip_grads(params: list, total_norm: float, max_norm: float) -> None:
    """Scale every gradient so the global norm is at most `max_norm` (0 = off)."""
    if max_norm <= 0:
        return
    coef = max_norm / (total_norm + 1e-6)
    if coef < 1.0:
        for p in params:
            g = local_grad(p)
            if g is not None:
                g.mul_(coef)


def sync_tied_grads(params: list, group: dist.ProcessGroup | None) -> None:
    """Sum the gradients of weights tied across the first and last pipeline stage."""
    if group is None or not params:
        return
    for p in params:
        dist.all_reduce(local_grad(p), group=group)
