"""Built-in pipeline schedules: every schedule `torch.distributed.pipelining` ships.

    [pipeline]
    schedule = "1f1b"   # gpipe, 1f1b, interleaved_1f1b, looped_bfs, interleaved_zb, zbv, dualpipev

Each says where its stages sit (loop: rank p holds p, p + pp, ...; V: p and 2*pp - 1 - p, so the
embedding and the head share rank 0), what it needs of parallel.pp and train.grad_acc, and how many
micro-batches a rank keeps in flight (for `meshtrain check`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshtrain.api import hookimpl

__version__ = "0.1.0"


@dataclass(frozen=True)
class TorchSchedule:
    """A torch schedule class (by name, imported when built) with its placement and rules."""

    class_name: str
    stages_per_rank: int = 1
    style: str = "loop"
    """"loop" or "v"."""
    min_grad_acc: str = ""
    """"", "pp" or "stages": grad_acc must be at least that many micro-batches."""
    rounds: bool = False
    """Interleaved: grad_acc must be a multiple of pp once it exceeds it (whole rounds)."""
    keeps_all: bool = False
    """Every micro-batch's activations stay until backward (GPipe, looped BFS)."""
    splits_backward: bool = False
    """Input and weight gradients in separate passes (zero bubble)."""
    evaluates: bool = True
    """Its `eval()` runs forward only. The V schedules' runtimes still step through their
    backward actions there, so [eval] goes through the core's forward sweep instead."""
    worker_imports: tuple[str, ...] = ("torch.distributed.pipelining",)
    """Imported once before CPU workers are forked (`build` imports it in each worker)."""

    def placement(self, pp_rank: int, pp: int) -> list[int]:
        if self.style == "v":
            return [pp_rank, 2 * pp - 1 - pp_rank]
        return [pp_rank + k * pp for k in range(self.stages_per_rank)]

    def validate(self, *, pp: int, grad_acc: int, num_layers: int) -> list[str]:
        problems = []
        need = {"": 1, "pp": pp, "stages": pp * self.stages_per_rank}[self.min_grad_acc]
        if grad_acc < need:
            what = "parallel.pp" if self.min_grad_acc == "pp" else "the stages (2 x parallel.pp)"
            problems.append(
                f"train.grad_acc: {grad_acc} micro-batches is fewer than {what} ({need}); "
                f"pipeline.schedule {self.class_name} needs grad_acc >= {need}"
            )
        if self.rounds and pp > 1 and grad_acc >= pp and grad_acc % pp:
            problems.append(
                f"train.grad_acc: {grad_acc} must be a multiple of parallel.pp ({pp}) for "
                f"the interleaved schedule {self.class_name}"
            )
        return problems

    def in_flight(self, pp_rank: int, pp: int, grad_acc: int) -> int:
        """Most micro-batches whose activations a rank keeps at once (an upper estimate)."""
        if self.keeps_all:
            return grad_acc
        warmup = (self.stages_per_rank - 1) * pp + 2 * (pp - 1 - pp_rank) + 1
        if self.stages_per_rank == 1:
            warmup = pp - pp_rank
        return min(grad_acc, math.ceil(warmup / self.stages_per_rank) + self.stages_per_rank - 1)

    def actions(self, pp_rank: int, pp: int, n_microbatches: int) -> list[tuple[str, int, int]]:
        """The compute actions torch's runtime runs on `pp_rank`, in order: (kind, stage,
        micro-batch), kind F, B (whole backward), I (its input part), W (its weight part) or
        REDUCE_GRAD (micro-batch -1); for `meshtrain plan`."""
        from torch.distributed.pipelining import schedules
        from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops

        cls = getattr(schedules, self.class_name)
        ops = get_schedule_ops(cls, pp, n_microbatches, num_stages_per_rank=self.stages_per_rank)
        order: list[tuple[str, int, int]] = []
        seen: dict[tuple[str, int], int] = {}
        for op in ops[pp_rank]:
            for action in (op.sub_actions or (op,)) if op is not None else ():
                kind = action.computation_type.value
                if kind == "REDUCE_GRAD":
                    order.append((kind, action.stage_index, -1))
                    continue
                # Number each stage's passes in order: torch 2.13's 1F1B labels the last rank's
                # forwards 1..n. Every schedule runs a stage's micro-batches in order.
                key = ("B" if kind == "I" else kind, action.stage_index)
                seen[key] = seen.get(key, -1) + 1
                order.append((kind, action.stage_index, seen[key]))
        return order

    def build(self, stages: list[Any], n_microbatches: int, loss_fn: Callable) -> Any:
        from torch.distributed.pipelining import schedules

        cls = getattr(schedules, self.class_name)
        # scale_grads=False: meshtrain's loss is already divided by the global token count.
        first = stages[0] if self.stages_per_rank == 1 else stages
        return cls(first, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)


SCHEDULES = {
    "gpipe": TorchSchedule("ScheduleGPipe", keeps_all=True),
    "1f1b": TorchSchedule("Schedule1F1B", min_grad_acc="pp"),
    "interleaved_1f1b": TorchSchedule(
        "ScheduleInterleaved1F1B", stages_per_rank=2, min_grad_acc="pp", rounds=True
    ),
    "looped_bfs": TorchSchedule("ScheduleLoopedBFS", stages_per_rank=2, keeps_all=True),
    "interleaved_zb": TorchSchedule(
        "ScheduleInterleavedZeroBubble",
        stages_per_rank=2,
        min_grad_acc="pp",
        rounds=True,
        splits_backward=True,
    ),
    "zbv": TorchSchedule(
        "ScheduleZBVZeroBubble",
        stages_per_rank=2,
        style="v",
        min_grad_acc="pp",
        splits_backward=True,
        evaluates=False,
    ),
    "dualpipev": TorchSchedule(
        "ScheduleDualPipeV",
        stages_per_rank=2,
        style="v",
        min_grad_acc="stages",
        splits_backward=True,
        evaluates=False,
    ),
}


@hookimpl
def pipeline_schedules() -> dict[str, TorchSchedule]:
    return dict(SCHEDULES)
