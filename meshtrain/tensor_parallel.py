"""Tensor parallel: apply the family's DTensor plan on the tp axis, and the vocab-parallel loss.

The head returns logits sharded over the vocabulary (Shard(-1)); `loss_parallel` computes the
cross-entropy from those shards without gathering full-vocabulary logits on any rank.
"""

from __future__ import annotations

import contextlib
from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import loss_parallel, parallelize_module


def apply_tensor_parallel(stage: nn.Module, family: Any, tp_mesh: DeviceMesh, *,
                          sequence_parallel: bool) -> None:
    """Shard `stage` in place over `tp_mesh` (a no-op for tp = 1)."""
    if tp_mesh.size() == 1:
        return
    parallelize_module(stage, tp_mesh, family.tp_plan(stage, sequence_parallel=sequence_parallel))
    if sequence_parallel:
        # Hidden states between stages are sequence shards; rotary positions need the full length.
        stage.sequence_shards = tp_mesh.size()


def loss_context(tp: int) -> contextlib.AbstractContextManager:
    """Wraps forward and backward: vocab-parallel cross-entropy when tp > 1."""
    return loss_parallel() if tp > 1 else contextlib.nullcontext()
