"""Built-in pipeline schedules, from `torch.distributed.pipelining`.

[pipeline]
schedule = "1f1b"   # or "gpipe", "interleaved_1f1b"
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.distributed.pipelining import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from meshtrain import hookimpl


@dataclass(frozen=True)
class TorchSchedule:
    """A torch schedule class with the degree rules it needs."""

    schedule_class: type
    stages_per_rank: int = 1
    needs_grad_acc_ge_pp: bool = False

    def validate(self, *, pp: int, grad_acc: int) -> list[str]:
        problems = []
        if self.needs_grad_acc_ge_pp and grad_acc < pp:
            problems.append(
                f"train.grad_acc: {grad_acc} micro-batches is fewer than parallel.pp "
                f"({pp}); this schedule needs grad_acc >= pp"
            )
        if self.stages_per_rank > 1 and pp > 1 and grad_acc % pp:
            problems.append(
                f"train.grad_acc: {grad_acc} must be a multiple of parallel.pp "
                f"({pp}) for an interleaved schedule"
            )
        return problems

    def build(self, stages: list[Any], n_microbatches: int, loss_fn: Callable) -> Any:
        # scale_grads=False: meshtrain's loss is already divided by the global token count.
        if self.stages_per_rank == 1:
            return self.schedule_class(
                stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False
            )
        return self.schedule_class(
            stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False
        )


@hookimpl
def pipeline_schedules() -> dict[str, TorchSchedule]:
    return {
        "gpipe": TorchSchedule(ScheduleGPipe),
        "1f1b": TorchSchedule(Schedule1F1B, needs_grad_acc_ge_pp=True),
        "interleaved_1f1b": TorchSchedule(
            ScheduleInterleaved1F1B, stages_per_rank=2, needs_grad_acc_ge_pp=True
        ),
    }
