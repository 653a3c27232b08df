"""Finish the gradients of one step, in one place, in this order:

    align placements -> average over dp (unless FSDP2 did) -> sum tied copies
    -> global norm over every axis -> clip

Expert weights (meshtrain.experts) are held by the edp ranks only, and each already has the
gradient of every token its ep group routed to it: they are summed over edp and divided by dp.

The global norm is one world-wide all-reduce of weighted local squares: a parameter held by k ranks
(replicated over dp or tp) counts 1/k from each, a tied copy counts 0 (its partner counts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


@dataclass
class Tie:
    """This rank's side of a tied pair: the copies it holds (1, or 2 when both sit on this rank
    in different stages) and the group with the rank holding the other side (None when local)."""

    params: list[nn.Parameter]
    group: dist.ProcessGroup | None


@dataclass
class Reduction:
    """Gradients to sum over `group` (of `size` ranks; None: nothing to sum) and divide by
    `divisor`."""

    params: list[nn.Parameter]
    group: dist.ProcessGroup | None
    size: int
    divisor: int


@dataclass
class GradState:
    """What finishing needs to know about this rank's parameters."""

    params: list[nn.Parameter]
    norm_weights: list[float]
    ties: list[Tie]
    reductions: list[Reduction]
    """Averages over dp still to do: all of them with replicated dp; under FSDP2, which averaged
    each gradient over its own mesh, only the experts' rescaling from edp to dp."""


def finish_grads(state: GradState, max_norm: float) -> torch.Tensor:
    """Make every gradient final and clipped; returns the global gradient norm (before clip, a
    0-d fp64 tensor: reading it is the caller's sync)."""
    align_placements(state.params)
    for r in state.reductions:
        average(r.params, r.group, r.size, r.divisor)
    for tie in state.ties:
        sum_tied(tie)
    square = weighted_square_norm(state.params, state.norm_weights)
    dist.all_reduce(square)
    norm = square.sqrt()
    clip(state.params, norm, max_norm)
    return norm


def align_placements(params: list[nn.Parameter]) -> None:
    """Give each DTensor gradient its parameter's placements (some come back Replicate or Partial,
    and a collective on mismatched local shapes fails)."""
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and g.placements != p.placements:
            p.grad = g.redistribute(p.device_mesh, p.placements)


def average(params: list[nn.Parameter], group: dist.ProcessGroup, size: int, divisor: int) -> None:
    """Sum gradients over `group` in one flat buffer (one collective, not one per parameter:
    gloo latency dominates small messages) and divide by `divisor`."""
    grads = [local_grad(p) for p in params if p.grad is not None]
    if not grads or (size == 1 and divisor == 1):
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    if group is not None and size > 1:
        dist.all_reduce(flat, group=group)
    flat /= divisor
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def sum_tied(tie: Tie) -> None:
    """Every copy of a tied weight gets the sum of all copies' gradients."""
    grads = [local_grad(p) for p in tie.params]
    total = grads[0] if len(grads) == 1 else torch.stack(grads).sum(0)
    if tie.group is not None:
        dist.all_reduce(total, group=tie.group)
    for g in grads:
        if g is not total:
            g.copy_(total)


def local_grad(p: torch.Tensor) -> torch.Tensor | None:
    g = p.grad
    return g.to_local() if isinstance(g, DTensor) else g


def weighted_square_norm(params: list, weights: list[float]) -> torch.Tensor:
    """This rank's share of the squared global gradient norm (fp64, a 0-d tensor)."""
    device = params[0].device if params else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for p, w in zip(params, weights, strict=True):
        if w and p.grad is not None:
            total += w * local_grad(p).detach().double().square().sum()
    return total


def clip(params: list, total_norm: torch.Tensor, max_norm: float) -> None:
    """Scale every gradient so the global norm is at most `max_norm` (0 = off). The factor stays
    a tensor (1.0 exactly when under the limit), so clipping needs no host sync."""
    if max_norm <= 0:
        return
    coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    for p in params:
        g = local_grad(p)
        if g is not None:
            g.mul_(coef.to(g.dtype))
