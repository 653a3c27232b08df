"""Data parallel over the dp axis: FSDP2 sharding, or replicated weights with a gradient all-reduce.

Both average gradients over dp. The loss each dp rank computes is scaled by dp (see
meshtrain.step), so the average is the gradient of the global token-mean loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor


def apply_fsdp(stage: nn.Module, dp_mesh: DeviceMesh) -> None:
    """FSDP2 over dp: each repeated block (an item of a ModuleList/ModuleDict) is its own unit, so
    only one block's full weights exist at a time; the rest of the stage is the root unit."""
    for module in list(stage.modules()):
        if isinstance(module, nn.ModuleList | nn.ModuleDict):
            for block in module.values() if isinstance(module, nn.ModuleDict) else module:
                fully_shard(block, mesh=dp_mesh)
    fully_shard(stage, mesh=dp_mesh)


def align_grad_placements(params: list[nn.Parameter]) -> None:
    """Give each DTensor gradient its parameter's placements (some come back Replicate or Partial,
    and a collective on mismatched local shapes fails)."""
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and g.placements != p.placements:
            p.grad = g.redistribute(p.device_mesh, p.placements)


def all_reduce_grads(params: list[nn.Parameter], group: dist.ProcessGroup, world: int) -> None:
    """Average replicated gradients over `group` in one flat buffer (one collective, not one per
    parameter: gloo latency dominates small messages)."""
    if world == 1:
        return
    locals_ = [
        p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        for p in params
        if p.grad is not None
    ]
    flat = torch.cat([g.reshape(-1) for g in locals_])
    dist.all_reduce(flat, group=group)
    flat /= world
    offset = 0
    for g in locals_:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
