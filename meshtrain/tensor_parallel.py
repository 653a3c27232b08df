"""Tensor parallel pieces the plans use beside torch's styles.

The head returns logits sharded over the vocabulary (Shard(-1)); meshtrain.cross_entropy computes
the loss from those shards without gathering full-vocabulary logits on any rank. The embedding is
split over the vocabulary by `VocabParallelEmbedding`, whose backward produces only the local
shard's gradient. Key/value projections go through `KeyValueParallel`, which also
serves models with fewer key/value heads than tp ranks (replicated, each rank using its own head).
"""

from __future__ import annotations

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
from torch.distributed.tensor.parallel import ParallelStyle


class VocabParallelEmbedding(ParallelStyle):
    """An `nn.Embedding` split over the vocabulary (weight Shard(0) on tp).

    Each rank looks up the ids that fall in its rows, zeros the others, and the partial outputs are
    summed (or reduce-scattered to `output_layout` = Shard(1) under sequence parallel). Unlike
    RowwiseParallel on an embedding, whose backward in torch 2.13 builds a full Replicate
    vocab x hidden gradient on every tp rank, the gradient here is the local shard only."""

    def __init__(self, output_layout: Placement | None = None):
        super().__init__()
        self.output_layout = output_layout or Replicate()

    def shard_dims(self, module: nn.Module, tp: int) -> dict[str, int]:
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
    # A copy, not to_local()'s view: FSDP2 hooks an embedding unit's output for backward, and an
    # in-place op on a view would skip that hook (FSDP2 warns on views).
    return summed.to_local().clone()


class ChannelShardedNorm(ParallelStyle):
    """A norm over the last dim of a column-parallel output (OLMo2's RMSNorm over a whole q or k
    projection): its weight is Shard(0) like the channels it scales, and its input is read as
    Shard(-1), so DTensor sums the statistics over tp before normalising each rank's channels."""

    def shard_dims(self, module: nn.Module, tp: int) -> dict[str, int]:
        return {"weight": 0}

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        weight = distribute_tensor(module.weight, device_mesh, [Shard(0)], src_data_rank=None)
        module.register_parameter("weight", nn.Parameter(weight))
        module.register_forward_pre_hook(partial(_as_channel_shards, device_mesh))
        module.register_forward_hook(lambda _module, _args, out: out.to_local())
        return module


def _as_channel_shards(mesh: DeviceMesh, module: nn.Module, args: tuple) -> tuple:
    (x,) = args  # (B, T, channels / tp), this rank's channels
    return (DTensor.from_local(x, mesh, [Shard(x.dim() - 1)], run_check=False),)


class KeyValueParallel(ParallelStyle):
    """A key or value projection (`nn.Linear` with num_kv_heads * head_dim outputs) beside
    column-parallel queries, for any tp that divides num_heads and divides or is a multiple of
    num_kv_heads.

    When tp divides num_kv_heads this is ColwiseParallel (weight and bias Shard(0)). With fewer
    key/value heads than tp ranks (multi-query, small GQA), the weight and bias stay Replicate and
    each rank computes only the key/value head its query heads use: rank r holds query heads
    [r H / tp, (r + 1) H / tp) and query head q uses kv head q // (H / kv), so rank r needs kv
    head r kv // tp (one head: H / tp query heads never span two groups when kv divides tp). The
    attention must then repeat it H / tp times (`local_kv_groups`). Each rank's loss share only
    touches its own heads, so the weight's and the input's gradients come back Partial and are
    summed over tp."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

    def replicates(self, tp: int) -> bool:
        """Whether the weight stays whole on each of `tp` ranks."""
        return self.num_kv_heads % tp != 0

    def shard_dims(self, module: nn.Module, tp: int) -> dict[str, int]:
        if self.replicates(tp):
            return {}
        return {name: 0 for name, _ in module.named_parameters(recurse=False)}

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        from torch.distributed.tensor.parallel import ColwiseParallel

        tp = device_mesh.size()
        if not self.replicates(tp):
            return ColwiseParallel()._apply(module, device_mesh)
        if tp % self.num_kv_heads or self.num_heads % tp:
            raise ValueError(
                f"KeyValueParallel: tp {tp} must divide {self.num_heads} heads and divide or be "
                f"a multiple of {self.num_kv_heads} key/value heads"
            )
        assert isinstance(module, nn.Linear)
        for name, param in list(module.named_parameters(recurse=False)):
            whole = distribute_tensor(param, device_mesh, [Replicate()], src_data_rank=None)
            module.register_parameter(name, nn.Parameter(whole, param.requires_grad))
        head = device_mesh.get_local_rank() * self.num_kv_heads // tp
        rows = slice(head * self.head_dim, (head + 1) * self.head_dim)
        module.forward = partial(_kv_head, module, device_mesh, rows)
        return module


def local_kv_groups(num_heads: int, num_kv_heads: int, tp: int) -> int:
    """Query heads per local key/value head on each of `tp` ranks (see KeyValueParallel)."""
    if num_kv_heads % tp == 0:
        return num_heads // num_kv_heads
    return num_heads // tp


def _kv_head(module: nn.Linear, mesh: DeviceMesh, rows: slice, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, DTensor):
        x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
    elif x.placements != (Replicate(),):
        x = x.redistribute(mesh, [Replicate()])
    # Local math on this rank's rows; the gradients are this rank's share: Partial.
    partial_grad = [Partial()]
    local_x = x.to_local(grad_placements=partial_grad)  # (B, T, C)
    weight = module.weight.to_local(grad_placements=partial_grad)[rows]  # (head_dim, C)
    bias = module.bias
    if bias is not None:
        bias = bias.to_local(grad_placements=partial_grad)[rows]
    return F.linear(local_x, weight, bias)  # (B, T, head_dim)


class FusedColwiseParallel(ParallelStyle):
    """An `nn.Linear` whose output is several blocks side by side (Phi-3's qkv_proj [Q | K | V],
    gate_up_proj [gate | up]) that returns each rank's part of every block ([Q_r | K_r | V_r]),
    as if each block were a ColwiseParallel linear of its own.

    The weight and bias are Shard(0) as under ColwiseParallel, so checkpoints and Hugging Face
    slices are plain contiguous rows; but those rows hold the wrong mix of blocks, so the output
    is gathered over tp (all-gather in forward, reduce-scatter in backward) and each rank keeps
    its parts. `blocks`: (heads, head size) per block, e.g. ((H, d), (kv, d), (kv, d)) or
    ((I, 1), (I, 1)). A block with fewer heads than tp ranks gives rank r its head r heads // tp
    (the key/value head its query heads use, as KeyValueParallel)."""

    def __init__(self, blocks: tuple[tuple[int, int], ...]):
        super().__init__()
        self.blocks = tuple(blocks)

    def shard_dims(self, module: nn.Module, tp: int) -> dict[str, int]:
        return {name: 0 for name, _ in module.named_parameters(recurse=False)}

    def rows(self, rank: int, tp: int) -> torch.Tensor:
        """Indices into the fused output of rank `rank`'s parts, block by block."""
        parts, start = [], 0
        for heads, size in self.blocks:
            first, count = rank * heads // tp, max(1, heads // tp)
            parts.append(torch.arange(start + first * size, start + (first + count) * size))
            start += heads * size
        return torch.cat(parts)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        from torch.distributed.tensor.parallel import ColwiseParallel

        tp = device_mesh.size()
        for heads, _ in self.blocks:
            if heads % tp and tp % heads:
                raise ValueError(
                    f"FusedColwiseParallel: tp {tp} must divide or be a multiple of {heads}"
                )
        module = ColwiseParallel(use_local_output=False)._apply(module, device_mesh)
        rows = self.rows(device_mesh.get_local_rank(), tp)
        module.register_forward_hook(partial(_own_rows, device_mesh, rows))
        return module


def _own_rows(mesh: DeviceMesh, rows: torch.Tensor, module: nn.Module, inputs: Any, out: Any):
    whole = out.redistribute(mesh, [Replicate()])  # (..., fused), all-gathered
    local = whole.to_local(grad_placements=[Partial()])  # each rank's share of the gradient
    return local.index_select(-1, rows.to(local.device))  # (..., this rank's parts)


def shard_dims(module: nn.Module, style: Any, tp: int) -> dict[str, int]:
    """Which of `module`'s own parameters `style` splits over tp, and along which dim, for
    counting without a process group. A style of a plugin's own says so with `shard_dims`."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    own = dict(module.named_parameters(recurse=False))
    if hasattr(style, "shard_dims"):
        return style.shard_dims(module, tp)
    if isinstance(style, ColwiseParallel):  # Linear (out, in) and bias (out); Embedding (V, C)
        return {name: 1 if isinstance(module, nn.Embedding) else 0 for name in own}
    if isinstance(style, RowwiseParallel):  # the bias stays whole
        return {"weight": 0 if isinstance(module, nn.Embedding) else 1} if "weight" in own else {}
    return {}
