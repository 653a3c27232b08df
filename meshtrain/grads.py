"""Finish the gradients of one step, in one place, in this order:

    align placements -> sum tied copies into the source -> average over dp (unless FSDP2 did)
    -> global norm over every axis -> clip

and, after the optimizer step, `share_tied`: a tied pair (the embedding and the head on another
stage) is stepped once, on its source's side; the copy has no optimizer state and takes the
source's new values.

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
    """This rank's side of a tied pair: the source (stepped by the optimizer) and/or the copy
    (not), both when they sit on this rank in different stages, and the group of two with the
    rank holding the other side (None when local)."""

    source: nn.Parameter | None
    copy: nn.Parameter | None
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
    for tie in state.ties:  # first: a copy's gradient, summed into its source, is not averaged
        sum_tied(tie)
    for r in state.reductions:
        average(r.params, r.group, r.size, r.divisor)
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
    """Sum gradients over `group` and divide them by `divisor`: a gradient of at least
    BUCKET_BYTES in place, small ones together in flat buffers (`buckets`: one collective per
    bucket, not per parameter, since gloo's latency dominates small messages)."""
    grads = [local_grad(p) for p in params if p.grad is not None]
    if not grads or (size == 1 and divisor == 1):
        return
    for bucket in buckets(grads, BUCKET_BYTES):
        whole = len(bucket) == 1 and bucket[0].is_contiguous()
        flat = bucket[0] if whole else torch.cat([g.reshape(-1) for g in bucket])
        if group is not None and size > 1:
            dist.all_reduce(flat, group=group)
        if divisor != 1:
            flat /= divisor
        if not whole:
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()


BUCKET_BYTES = 8 * 2**20
"""Gradients this large are reduced where they are. One flat buffer for all of them was a copy
of every gradient (in bench-small, the 25 MB embedding gradient copied in and out each step)."""


def buckets(grads: list[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """`grads` in order, in groups of one dtype and under `limit` bytes together; a gradient of
    `limit` bytes or more in a group of its own. Every rank of a group forms the same ones."""
    groups: list[list[torch.Tensor]] = []
    current: list[torch.Tensor] = []
    held = 0
    for g in grads:
        size = g.numel() * g.element_size()
        if current and (size >= limit or held + size > limit or g.dtype != current[0].dtype):
            groups.append(current)
            current, held = [], 0
        current.append(g)
        held += size
        if size >= limit:
            groups.append(current)
            current, held = [], 0
    return groups + ([current] if current else [])


def sum_tied(tie: Tie) -> None:
    """The source's gradient becomes the sum of both sides'; the copy's is dropped (its weight
    is not stepped, see `share_tied`)."""
    if tie.group is None:
        local_grad(tie.source).add_(local_grad(tie.copy))
    else:
        mine = tie.source if tie.source is not None else tie.copy
        dist.reduce(local_grad(mine), group=tie.group, group_dst=_source_rank(tie))
    if tie.copy is not None:
        tie.copy.grad = None


@torch.no_grad()
def share_tied(ties: list[Tie]) -> None:
    """After the optimizer step: each copy takes its source's new values."""
    for tie in ties:
        if tie.group is None:
            local_data(tie.copy).copy_(local_data(tie.source))
        else:
            mine = tie.source if tie.source is not None else tie.copy
            dist.broadcast(local_data(mine), group=tie.group, group_src=_source_rank(tie))


def stepped(state: GradState) -> list[nn.Parameter]:
    """The parameters the optimizer steps: all but the tied copies."""
    copies = {id(tie.copy) for tie in state.ties if tie.copy is not None}
    return [p for p in state.params if id(p) not in copies]


def _source_rank(tie: Tie) -> int:
    """The source's rank in the tie's group of two."""
    me = dist.get_rank(tie.group)
    return me if tie.source is not None else 1 - me


def local_data(p: torch.Tensor) -> torch.Tensor:
    return p._local_tensor if isinstance(p, DTensor) else p.data


def local_grad(p: torch.Tensor) -> torch.Tensor | None:
    g = p.grad
    return g.to_local() if isinstance(g, DTensor) else g


def weighted_square_norm(params: list, weights: list[float]) -> torch.Tensor:
    """This rank's share of the squared global gradient norm (fp64, a 0-d tensor)."""
    device = params[0].device if params else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for p, w in zip(params, weights, strict=True):
        if w and p.grad is not None:
            total += w * square_sum(local_grad(p).detach())
    return total


ROW = 1024


def square_sum(g: torch.Tensor) -> torch.Tensor:
    """sum(g**2) in fp64 without a copy of `g`. On CPU, rows of ROW elements are squared and
    summed by one batched matmul and the rows' sums added in fp64 (within 1e-9 of an fp64
    sum). `g.double().square()` made two fp64 copies of every gradient: 0.22 CPU-s a step on
    a first-stage rank of the reference run, 1.7-2.2 in one process, against 0.025 and 0.16-0.19
    now (session 11's machine, where fresh memory is slow: bench/fresh_memory.py). Elsewhere
    (CUDA casts as it reads) a norm in fp64."""
    flat = g.reshape(-1)
    whole = flat.numel() // ROW * ROW
    exact = flat.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    if flat.device.type != "cpu" or not exact or whole == 0:
        return torch.linalg.vector_norm(flat, dtype=torch.float64).square()
    rows = flat[:whole].view(-1, 1, ROW)
    total = torch.bmm(rows, rows.transpose(1, 2)).sum(dtype=torch.float64)
    return total + torch.linalg.vector_norm(flat[whole:], dtype=torch.float64).square()


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
