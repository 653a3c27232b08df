"""Seconds per kind of collective in a step, from torch's profiler (`log.comm_time = true`).

    timer = CommTimer(mesh.backend)
    with timer: ...            # one step
    timer.seconds              # {"all_reduce": 1.2, "broadcast": 0.8, "send": 0.1, ...}

Process groups record each collective as a profiler event "<backend>:<kind>". gloo runs it on a
thread of its own for as long as it takes, the wait for slower peers included, so on CPU the sum
is the time spent in (or waiting at) collectives; NCCL's event covers only the launch on the host,
not the kernel. Overlapping collectives (FSDP2 prefetch, async sends) each count in full.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

KINDS = (
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "broadcast",
    "reduce",
    "all_to_all",
    "send",
    "recv",
    "other",
)


class CommTimer:
    """The profiler runs inside the block; its events are read when `seconds` is first asked for
    (after the step's own timing: reading them takes a while)."""

    def __init__(self, backend: str):
        self.prefix = f"{backend}:"
        self.profiler = profile(activities=[ProfilerActivity.CPU])
        self._seconds: Counter[str] | None = None

    def __enter__(self) -> CommTimer:
        self.profiler.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.profiler.__exit__(*exc)

    @property
    def seconds(self) -> Counter[str]:
        if self._seconds is None:
            self._seconds = Counter()
            for event in self.profiler.events():
                if event.name.startswith(self.prefix):
                    kind = event.name[len(self.prefix) :]
                    key = kind if kind in KINDS else "other"
                    self._seconds[key] += event.cpu_time_total / 1e6
        return self._seconds


def seconds_by_pp_rank(timer: CommTimer, mesh: Any) -> dict[str, dict[str, list[float]]]:
    """{"comm_s": {kind: [mean seconds over the ranks of each pp rank]}} on every rank (one
    all-reduce); kinds that no rank used are left out."""
    import torch.distributed as dist

    pp = mesh.size("pp")
    table = torch.zeros(len(KINDS), pp, dtype=torch.float64, device=mesh.device)
    for i, kind in enumerate(KINDS):
        table[i, mesh.pp_rank] = timer.seconds[kind] / (mesh.world // pp)
    dist.all_reduce(table)
    return {
        "comm_s": {
            kind: [round(float(v), 4) for v in table[i]]
            for i, kind in enumerate(KINDS)
            if bool(table[i].any())
        }
    }
