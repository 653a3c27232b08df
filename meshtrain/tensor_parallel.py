"""Tensor parallel pieces the plans use: the vocab-parallel embedding and the parallel loss.

The head returns logits sharded over the vocabulary (Shard(-1)); `loss_parallel` computes the
cross-entropy from those shards without gathering full-vocabulary logits on any rank. The
embedding is split over the vocabulary by `VocabParallelEmbedding`, whose backward produces only
the local shard's gradient.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (
    DTensor,
    Partial,
    Placement,
    Replicate,
    Shard,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import ParallelStyle, loss_parallel


def loss_context(tp: int) -> contextlib.AbstractContextManager:
    """Wraps forward and backward: vocab-parallel cross-entropy when tp > 1."""
    return loss_parallel() if tp > 1 else contextlib.nullcontext()


class VocabParallelEmbedding(ParallelStyle):
    """An `nn.Embedding` split over the vocabulary (weight Shard(0) on tp).

    Each rank looks up the ids that fall in its rows, zeros the others, and the partial outputs are
    summed (or reduce-scattered to `output_layout` = Shard(1) under sequence parallel). Unlike
    RowwiseParallel on an embedding, whose backward in torch 2.13 builds a full Replicate
    vocab x hidden gradient on every tp rank, the gradient here is the local shard only."""

    def __init__(self, output_layout: Placement | None = None):
        super().__init__()
        self.output_layout = output_layout or Replicate()

    def shard_dims(self, module: nn.Module) -> dict[str, int]:
        return {"weight": 0}

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        assert isinstance(module, nn.Embedding)
        weight = distribute_tensor(module.weight, device_mesh, [Shard(0)], src_data_rank=None)
        module.register_parameter("weight", nn.Parameter(weight))
        module.forward = partial(_lookup, module, device_mesh, self.output_layout)
        return module


def _lookup(
    module: nn.Embedding, mesh: DeviceMesh, output_layout: Placement, ids: torch.Tensor
) -> torch.Tensor:
    local = module.weight.to_local()  # (V / tp, C); its grad comes back as Shard(0)
    rows = local.shape[0]
    start = mesh.get_local_rank() * rows
    shifted = ids - start  # (B, T)
    outside = (shifted < 0) | (shifted >= rows)
    pad = module.padding_idx
    padding = pad - start if pad is not None and 0 <= pad - start < rows else None
    out = F.embedding(shifted.masked_fill(outside, 0), local, padding_idx=padding)  # (B, T, C)
    out = out.masked_fill(outside.unsqueeze(-1), 0.0)
    summed = DTensor.from_local(out, mesh, [Partial()]).redistribute(mesh, [output_layout])
    return summed.to_local()


def shard_dims(module: nn.Module, style: Any) -> dict[str, int]:
    """Which of `module`'s own parameters `style` splits over tp, and along which dim, for
    counting without a process group. A style of a plugin's own says so with `shard_dims`."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    own = dict(module.named_parameters(recurse=False))
    if hasattr(style, "shard_dims"):
        return style.shard_dims(module)
    if isinstance(style, ColwiseParallel):  # Linear (out, in) and bias (out); Embedding (V, C)
        return {name: 1 if isinstance(module, nn.Embedding) else 0 for name in own}
    if isinstance(style, RowwiseParallel):  # the bias stays whole
        return {"weight": 0 if isinstance(module, nn.Embedding) else 1} if "weight" in own else {}
    return {}
