"""What the MoE blocks measure in a step: expert load, the aux loss and all-to-all time.

    module.moe_stats.tokens += counts     # meshtrain.experts, in each block's forward
    metrics.update(step_stats(blocks, moe_layers, num_experts, sequences, device))

Each MoE block sums its own `ExpertStats`; `step_stats` adds every block's over the world once a
step and resets them. Forwards that are not training (`uncounted`) leave them alone.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

_UNCOUNTED = threading.local()


@contextlib.contextmanager
def uncounted() -> Iterator[None]:
    """Forwards that are not training (the pipeline's shape inference on empty tensors) leave
    the expert load and aux loss metrics alone."""
    _UNCOUNTED.active = True
    try:
        yield
    finally:
        _UNCOUNTED.active = False


def counting() -> bool:
    """Whether this forward's routing counts towards the metrics (see `uncounted`)."""
    return not getattr(_UNCOUNTED, "active", False)


@dataclass
class ExpertStats:
    """Summed since the last `reset`: slots routed to each expert, and the aux loss."""

    tokens: torch.Tensor
    aux: torch.Tensor

    @classmethod
    def zeros(cls, num_experts: int, device: torch.device) -> ExpertStats:
        return cls(torch.zeros(num_experts, device=device), torch.zeros((), device=device))

    def reset(self) -> None:
        self.tokens.zero_()
        self.aux.zero_()


class _Clock:
    seconds = 0.0
    """Wall seconds in the MoE all-to-alls since the last `step_stats` (complete on gloo when
    the call returns, not on NCCL)."""


CLOCK = _Clock()


def step_stats(
    blocks: list[tuple[nn.Module, Any]],
    moe_layers: int,
    num_experts: int,
    sequences: int,
    device: torch.device,
) -> dict[str, float]:
    """The last step's expert load, aux loss and all-to-all seconds (mean per rank) over the
    world, then reset: one all-reduce that every rank joins (MoE blocks on its stages or not).
    `blocks`: (module, its ExpertParallel) pairs; `sequences`: the global batch."""
    table = torch.zeros(moe_layers * num_experts + 2, dtype=torch.float64, device=device)
    table[-2], CLOCK.seconds = CLOCK.seconds, 0.0
    for module, style in blocks:
        stats = module.moe_stats
        if stats is None:
            continue
        start = style.layer * num_experts
        table[start : start + num_experts] += stats.tokens
        table[-1] += stats.aux
        stats.reset()
    dist.all_reduce(table)
    tokens = table[:-2].view(moe_layers, num_experts)  # top-k slots per layer and expert
    return {
        "aux_loss": float(table[-1]) / (moe_layers * sequences),
        "all_to_all_s": float(table[-2]) / dist.get_world_size(),
        "expert_tokens_max": float(tokens.max()),
        "expert_tokens_mean": float(tokens.mean()),
    }
