"""Memory of a step on fake tensors: torch's MemTracker, made fit for a pipeline step, and what
gloo allocates for collectives beside the tensors.

    tracker = StepMemTracker(stages); counter = StagingCounter(axes, tracker, staged=True)
    with counter, StepMemTracker.skipping_shape_propagation(), tracker: ...
    peak = max(categories(tracker.get_tracker_snapshot("peak")), counter.peak, key=total)
"""

from __future__ import annotations

import contextlib
from typing import Any

from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker

from meshtrain.comms import GATHERS, SCATTERS, CommCounter

CATEGORIES = {  # MemTracker's names -> the plan's
    "Parameter": "params",
    "Buffer": "params",
    "Gradient": "grads",
    "Optstate": "optimizer",
    "Activation": "activations",
    "Temp": "temporaries",
    "Other": "temporaries",
}


class StagingCounter(CommCounter):
    """A CommCounter that also follows what gloo allocates: each all-gather and reduce-scatter
    stages the whole payload in a temporary buffer of its own (measured: a 256 MB all-gather or
    reduce-scatter raises a process's peak by 255-259 MB; all-reduce works in place). Those
    buffers are no tensors, so `peak` is the tracker's moment with the largest of them added."""

    def __init__(self, axes: dict[str, str], tracker: MemTracker, staged: bool):
        super().__init__(axes)
        self.tracker, self.staged = tracker, staged
        self.peak: dict[str, int] = {}

    def counted(self, name: str, payload: int) -> None:
        if self.staged and (name in GATHERS or name in SCATTERS):
            now = categories(self.tracker.get_tracker_snapshot("current"))
            now["temporaries"] += payload
            self.peak = max(self.peak, now, key=total)


def categories(snapshot: dict) -> dict[str, int]:
    """A MemTracker snapshot ({device: {category: bytes}}) in the plan's categories."""
    peak = dict.fromkeys(("params", "grads", "optimizer", "activations", "temporaries"), 0)
    for per_device in snapshot.values():
        for name, value in per_device.items():
            key = CATEGORIES.get(str(getattr(name, "value", name)))
            if key:
                peak[key] += value
    return peak


def total(peak: dict[str, int]) -> int:
    return sum(peak.values())


class StepMemTracker(MemTracker):
    """torch's MemTracker for one training step of pipeline stages.

    - Each micro-batch calls a stage again before the last one's backward; MemTracker takes a
      second call of a top module for a new iteration and refuses it, so the stage's record
      (per-module statistics only, not the totals) is dropped first.
    - Only the global peak is kept (see `_update_peak_stats`).
    - On fake tensors DTensor works out each op's output shapes by running it on fake arguments
      of its own (`_propagate_tensor_meta_non_cached`). In a real run that happens under DTensor's
      own fake mode, which MemTracker skips; here that fake mode is the active one, so those
      tensors would count as memory: `skipping_shape_propagation` skips them too."""

    _skipping = 0

    def __init__(self, stages: list[nn.Module]):
        super().__init__()
        self.stages = stages

    def _pre_fw_hook(self, module: nn.Module, inputs: Any) -> None:
        if not self._mod_tracker.is_bw and any(module is stage for stage in self.stages):
            self.memory_tracking.pop(module, None)
        super()._pre_fw_hook(module, inputs)

    def _update_peak_stats(self, peak_state: Any) -> None:
        """Only the global peak: MemTracker also walks every module's record on every op, which
        made a large model's simulation minutes long."""
        for device, snapshot in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snapshot["Total"]:
                self._peak_mem[device] = snapshot["Total"]
                self._peak_mem_snap[device] = dict(snapshot)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if StepMemTracker._skipping:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)

    @staticmethod
    @contextlib.contextmanager
    def skipping_shape_propagation() -> Any:
        from torch.distributed.tensor._sharding_prop import ShardingPropagator

        original = ShardingPropagator._propagate_tensor_meta_non_cached

        def propagate(self: Any, *args: Any, **kwargs: Any) -> Any:
            StepMemTracker._skipping += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                StepMemTracker._skipping -= 1

        ShardingPropagator._propagate_tensor_meta_non_cached = propagate
        try:
            yield
        finally:
            ShardingPropagator._propagate_tensor_meta_non_cached = original
