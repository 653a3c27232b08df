"""Pipeline stages as arithmetic: which layers each stage holds and which pp rank holds it.

Stages are numbered 0..num_stages-1 in model order; stage 0 also holds the embedding, the last the
norm + head. The schedule's `placement` says which stages each pp rank holds (loop: p, p + pp, ...;
V: p and 2*pp - 1 - p). No torch here: `meshtrain check` and the workers share these rules.
"""

from __future__ import annotations

from typing import Any


def partition_layers(num_layers: int, num_stages: int) -> list[range]:
    """Balanced contiguous layer ranges; earlier stages take the extra layers, because the last
    stage also runs the norm, the head and the loss. Never drops a layer."""
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for stage in range(num_stages):
        count = base + (1 if stage < extra else 0)
        ranges.append(range(start, start + count))
        start += count
    assert start == num_layers and all(len(r) > 0 for r in ranges)
    return ranges


def stage_ranks(schedule: Any, pp: int) -> dict[int, int]:
    """Stage id -> the pp rank that holds it, from the schedule's placement."""
    return {stage: rank for rank in range(pp) for stage in schedule.placement(rank, pp)}


def describe_stages(num_layers: int, num_stages: int) -> list[str]:
    """One line per stage: what it holds, for logs and `meshtrain check`."""
    lines = []
    for index, layers in enumerate(partition_layers(num_layers, num_stages)):
        parts = ["embedding"] if index == 0 else []
        parts.append(
            f"layer {layers.start}"
            if len(layers) == 1
            else f"layers {layers.start}-{layers.stop - 1}"
        )
        parts += ["norm + head"] if index == num_stages - 1 else []
        lines.append(f"stage {index}: {', '.join(parts)}")
    return lines
