"""Count what a rank sends: every collective and point-to-point op, its bytes and its mesh axis.

    with CommCounter(axis_names(mesh)) as counter:
        ...                                    # forward, backward, grads, optimizer
    counter.totals()  # {"tp": Traffic(calls=24, bytes=...), "dp": ..., "pp": ..., "world": ...}

A TorchDispatchMode sees the ops the process group runs (c10d: FSDP2's all-gathers and
reduce-scatters, `dist.all_reduce`, send and recv, all-to-all) and the functional ones DTensor
lowers to (tensor parallel), in forward and in backward. Bytes are each op's payload on this rank:
the gathered tensor of an all-gather, the input of a reduce-scatter, the tensor of an all-reduce,
send or recv, the input of an all-to-all. `meshtrain plan` counts its simulated step with it; a
run with `log.comms = true` counts every step (some Python per op, so it is off by default).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

NAMESPACES = {"c10d", "_c10d_functional"}
NOT_TRAFFIC = {
    "wait_tensor",
    "_wrap_tensor_autograd",
    "barrier",
    "monitored_barrier_",
}
GATHERS = {"_allgather_base_", "all_gather_into_tensor", "allgather_"}
SCATTERS = {"_reduce_scatter_base_", "reduce_scatter_tensor", "reduce_scatter_"}


@dataclass(frozen=True)
class Traffic:
    calls: int
    bytes: int


class CommCounter(TorchDispatchMode):
    """Counts collectives by axis. `axes`: process group name -> axis name; groups not in it
    count as "world" (the metric and norm all-reduces span the world)."""

    def __init__(self, axes: dict[str, str]):
        super().__init__()
        self.axes = axes
        self.depth = 0
        self.calls: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor lowers itself to functional collectives first
        self.depth += 1
        try:
            out = func(*args, **(kwargs or {}))
        finally:
            self.depth -= 1
        namespace, name = func.namespace, func._opname
        # depth: a functional collective runs its c10d op inside itself (counted once, as itself)
        if namespace in NAMESPACES and name not in NOT_TRAFFIC and not self.depth:
            axis = self.axes.get(_group_name(args), "world")
            payload = _payload(name, args, out)
            self.calls[axis] += 1
            self.bytes[axis] += payload
            self.counted(name, payload)
        return out

    def counted(self, name: str, payload: int) -> None:
        """Called after each op counted (for subclasses)."""

    def totals(self) -> dict[str, Traffic]:
        return {axis: Traffic(self.calls[axis], self.bytes[axis]) for axis in sorted(self.calls)}

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()


AXES = ("dp", "ep", "pp", "tp", "world")


def by_pp_rank(counter: CommCounter, mesh: Any) -> dict[str, dict[str, list[int]]]:
    """The step's traffic of the ranks (dp 0, pp p, tp 0) for every p, on every rank (one
    all-reduce): {"comm_bytes": {axis: [per pp rank]}, "comm_calls": {...}}."""
    import torch.distributed as dist

    pp = mesh.size("pp")
    table = torch.zeros(2, len(AXES), pp, dtype=torch.float64, device=mesh.device)
    if mesh.dp_rank == 0 and mesh.tp_rank == 0:
        for i, axis in enumerate(AXES):
            table[0, i, mesh.pp_rank] = counter.bytes[axis]
            table[1, i, mesh.pp_rank] = counter.calls[axis]
    dist.all_reduce(table)
    return {
        key: {axis: [int(v) for v in table[k, i]] for i, axis in enumerate(AXES)}
        for k, key in enumerate(("comm_bytes", "comm_calls"))
    }


def axis_names(mesh: Any, ties: Any = ()) -> dict[str, str]:
    """Process group name -> axis for a meshtrain Mesh: tp, pp, dp (and edp, its part holding the
    same experts), ep; the groups of tied copies (`GradState.ties`) join pp ranks. Ops on a
    size-1 axis move nothing between ranks; they count as "world". Where axes span the same
    ranks torch may give them one group (the world's, when one axis is all of it): the later
    axis here names it."""
    names = {tie.group.group_name: "pp" for tie in ties if tie.group is not None}
    for axis in ("pp", "tp", "edp", "dp", "ep"):
        if mesh.size(axis) > 1:  # torch may hand one rank's size-1 axes one group
            names[mesh.group(axis).group_name] = "dp" if axis == "edp" else axis
    return names


def _group_name(args: Any) -> str | None:
    from torch._C._distributed_c10d import ProcessGroup

    names = []
    for arg in tree_flatten(args)[0]:
        if isinstance(arg, ProcessGroup):
            return arg.group_name
        if isinstance(arg, torch.ScriptObject):
            try:
                return ProcessGroup.unbox(arg).group_name
            except RuntimeError:  # a boxed ReduceOp
                continue
        if isinstance(arg, str):  # functional collectives: (..., reduce_op, ..., group_name)
            names.append(arg)
    return names[-1] if names else None


def _payload(name: str, args: Any, out: Any) -> int:
    if name in GATHERS:  # c10d: (output, input, ...); functional: (input, size, group) -> output
        tensors = args[0] if name != "all_gather_into_tensor" else out
    elif name in SCATTERS or name == "alltoall_base_":  # c10d: (output, input, ...)
        tensors = args[1] if name != "reduce_scatter_tensor" else args[0]
    else:
        tensors = args[0]
    tensors = tree_flatten(tensors)[0]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
