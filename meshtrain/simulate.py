"""Simulate one training step of a job's ranks in this process, without their memory or peers.

    sims = simulate_job(job)   # one RankSim per pipeline position (dp and tp peers are alike)

Each simulated rank joins torch's fake process group (collectives return at once, nothing is
sent) as the rank (dp 0, pp p, tp 0) of the job's full world, builds its part of the model with
the workers' own code (`build_parallel_model`: TP, experts, checkpointing, FSDP2) with parameters
as fake tensors, and runs one step: the micro-batches in the schedule's own order of actions
(forward, backward, the input and weight passes of zero-bubble schedules), then `finish_grads` and
the optimizer. torch's MemTracker follows every tensor (peak bytes by category) and a CommCounter
every collective and point-to-point op (calls and bytes by mesh axis).

Where it differs from the run: a zero-bubble weight pass (W) is folded into its input pass (I),
so a schedule that splits backward keeps slightly less here; the process group's own buffers, the
interpreter and the allocator's slack are not tensors, and `meshtrain plan` adds them as a
measured baseline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.fsdp import FSDPModule, fully_shard

from meshtrain.comms import GATHERS, SCATTERS, CommCounter, Traffic, axis_names
from meshtrain.errors import UserError
from meshtrain.experts import balanced_routing
from meshtrain.grads import finish_grads
from meshtrain.job import Job
from meshtrain.layout import rank_of
from meshtrain.mesh import Mesh, init_mesh
from meshtrain.model import ParallelModel, build_parallel_model
from meshtrain.optim import build_optimizer
from meshtrain.pipeline import partition_layers, stage_ranks
from meshtrain.step import Stepper, TokenLoss
from meshtrain.tensor_parallel import loss_context

CATEGORIES = {  # MemTracker's names -> the plan's
    "Parameter": "params",
    "Buffer": "params",
    "Gradient": "grads",
    "Optstate": "optimizer",
    "Activation": "activations",
    "Temp": "temporaries",
    "Other": "temporaries",
}


@dataclass(frozen=True)
class RankSim:
    """What one simulated rank held at its peak and sent in the step."""

    pp_rank: int
    rank: int
    peak: dict[str, int]
    """Bytes by category at the moment the total peaked: params, grads, optimizer, activations,
    temporaries."""
    traffic: dict[str, Traffic]
    """Per axis (dp, ep, pp, tp, world): calls and bytes this rank sent or received."""
    imports: int = 0
    """Resident bytes of a fresh process that imported what a worker imports (interpreter,
    torch, transformers, the plugins and the model's code), measured on this machine."""
    extrapolated: tuple[int, int] | None = None
    """The layer counts of the two simulations this one is extrapolated from (FOLD_ABOVE)."""

    @property
    def peak_bytes(self) -> int:
        return sum(self.peak.values())


FOLD_ABOVE = 4
FOLD_AT = (2, 3)
"""A job whose stages hold more than FOLD_ABOVE layers is simulated twice, at FOLD_AT layers per
stage, and extrapolated to its own count: memory and traffic grow linearly with the layers (the
layers are alike) once a stage has two (1 and 2 missed the prefetched FSDP2 unit by 9%), and a
simulated layer costs about half a second."""


def simulate_job(job: Job, *, workers: int = 0, fold: bool = True) -> list[RankSim]:
    """One RankSim per pp rank, in pp order. Each rank is simulated in a fresh process (DTensor's
    caches take meshes of one rank's world for another's: they compare by layout); pp rank 0
    first, since the others receive the hidden states it sends and need their shape."""
    imports = _measure_imports(["meshtrain.train", *_modules(job)[1:]])
    sims = _simulate_folded(job, workers) if fold else None
    sims = sims or _simulate_configs([job.config], workers, _modules(job))[0]
    return [dataclasses.replace(sim, imports=imports()) for sim in sims]


def _measure_imports(modules: list[str]) -> Any:
    """Start a fresh process that imports `modules`; returns a function waiting for its peak
    resident bytes (a worker's baseline here; 0 if it failed)."""
    # The resident size now, not ru_maxrss: Linux carries the forking parent's size into it.
    code = (
        f"import importlib, os\nfor m in {modules!r}: importlib.import_module(m)\n"
        "print(int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE'))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    found: list[int] = []

    def wait() -> int:
        if not found:
            out, _ = process.communicate()
            found.append(int(out.strip() or 0) if process.returncode == 0 else 0)
        return found[0]

    return wait


def _simulate_folded(job: Job, workers: int) -> list[RankSim] | None:
    """FOLD_AT's two simulations extrapolated, for stages of more than FOLD_ABOVE layers."""
    config, stages = job.config, job.num_stages
    if job.shape.num_layers <= FOLD_ABOVE * stages:
        return None
    small, large = FOLD_AT
    one, two = _simulate_configs(
        [_with_layers(config, small * stages), _with_layers(config, large * stages)],
        workers,
        _modules(job),
    )
    ranges = partition_layers(job.shape.num_layers, stages)
    sims = []
    for pp_rank, (a, b) in enumerate(zip(one, two, strict=True)):
        ids = job.schedule.placement(pp_rank, config.parallel.pp)
        held = sum(len(ranges[i]) for i in ids)
        sims.append(_extrapolate(a, b, small * len(ids), large * len(ids), held))
    return sims


def _simulate_configs(configs: list[Any], workers: int, preload: list[str]) -> list[list[RankSim]]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pp = configs[0].parallel.pp
    workers = workers or max(1, min(os.cpu_count() or 1, 4, pp * len(configs)))
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(preload)  # each process starts with them imported
    with ProcessPoolExecutor(workers, mp_context=context, max_tasks_per_child=1) as pool:
        firsts = [pool.submit(_simulate_rank_process, c, 0, None) for c in configs]
        results = []
        for config, first in zip(configs, firsts, strict=True):
            sim, boundary = first.result()
            rest = [pool.submit(_simulate_rank_process, config, p, boundary) for p in range(1, pp)]
            results.append((sim, rest))
        return [[sim, *(future.result()[0] for future in rest)] for sim, rest in results]


def _modules(job: Job) -> list[str]:
    """What a simulating process imports (5 s of torch, transformers and the model's code): the
    forkserver imports them once and every process starts from it."""
    names = ["meshtrain.simulate"]
    for plugin in (job.family, job.schedule, job.source, job.model_config):
        names.append(type(plugin).__module__)
    config = type(job.model_config).__module__
    if ".configuration_" in config:
        names.append(config.replace(".configuration_", ".modeling_"))
    return names


def _with_layers(config: Any, layers: int) -> Any:
    model = dataclasses.replace(
        config.model, options={**config.model.options, "num_hidden_layers": layers}
    )
    return dataclasses.replace(config, model=model)


def _extrapolate(a: RankSim, b: RankSim, layers_a: int, layers_b: int, layers: int) -> RankSim:
    """The RankSim of a rank holding `layers`, on the line through two simulated ones."""

    def line(x: int, y: int) -> int:
        return max(0, round(x + (y - x) * (layers - layers_a) / (layers_b - layers_a)))

    traffic = {
        axis: Traffic(
            line(a.traffic.get(axis, Traffic(0, 0)).calls, t.calls),
            line(a.traffic.get(axis, Traffic(0, 0)).bytes, t.bytes),
        )
        for axis, t in b.traffic.items()
    }
    return dataclasses.replace(
        b,
        peak={key: line(a.peak[key], value) for key, value in b.peak.items()},
        traffic=traffic,
        extrapolated=(layers_a, layers_b),
    )


def _simulate_rank_process(config: Any, pp_rank: int, boundary: Any) -> tuple[RankSim, Any]:
    from meshtrain.job import resolve_job

    job = resolve_job(config, planning=True)
    found = {"hidden": boundary} if boundary else {}
    sim = simulate_rank(job, pp_rank, found)
    return sim, found.get("hidden")


def simulate_rank(
    job: Job, pp_rank: int, boundary: dict[str, Any], *, fake: bool = True
) -> RankSim:
    """Simulate the rank (dp 0, pp `pp_rank`, tp 0) of `job` in this process, which must have no
    process group. `boundary`: the hidden states' (shape, dtype), filled by pp rank 0. `fake`:
    fake tensors (no memory); False runs the same step on real tensors (to check the fakes)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    par = job.config.parallel
    rank = rank_of(0, pp_rank, 0, par.pp, par.tp)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=job.config.world_size)
    try:
        mesh = init_mesh(job.config, "cpu")
        mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
        model = build_parallel_model(job, mesh, weights="none", materialize=mode)
        with mode:
            optimizer = _optimizer_with_state(model, job.config.train)
            tracker = StepMemTracker(model.stages)
            tracker.track_external(*model.stages, optimizer)
            staged = job.device_type == "cpu"  # gloo; NCCL works in fixed buffers of its own
            counter = StagingCounter(axis_names(mesh, model.grads.ties), tracker, staged)
            with counter, StepMemTracker.skipping_shape_propagation(), balanced_routing():
                with tracker:
                    _step(job, mesh, model, boundary)
                # The fused AdamW of a run allocates nothing; its fake kernel would (a copy of
                # every list it updates), so it steps untracked.
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        peak = max(_categories(tracker.get_tracker_snapshot("peak")), counter.peak, key=_total)
    finally:
        dist.destroy_process_group()
    return RankSim(pp_rank=pp_rank, rank=rank, peak=peak, traffic=counter.totals())


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
            now = _categories(self.tracker.get_tracker_snapshot("current"))
            now["temporaries"] += payload
            self.peak = max(self.peak, now, key=_total)


def _categories(snapshot: dict) -> dict[str, int]:
    """A MemTracker snapshot ({device: {category: bytes}}) in the plan's categories."""
    peak = dict.fromkeys(("params", "grads", "optimizer", "activations", "temporaries"), 0)
    for per_device in snapshot.values():
        for name, value in per_device.items():
            key = CATEGORIES.get(str(getattr(name, "value", name)))
            if key:
                peak[key] += value
    return peak


def _total(peak: dict[str, int]) -> int:
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


def _optimizer_with_state(model: ParallelModel, train: Any) -> torch.optim.Optimizer:
    """The run's optimizer after one step: a step from the second on holds its moments through
    forward and backward, and that is the step that peaks."""
    optimizer = build_optimizer(model.params, train)
    for p in model.params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def _step(job: Job, mesh: Mesh, model: ParallelModel, boundary: dict[str, Any]) -> None:
    """Forward, backward and the gradients' finish as `train_step` runs them, on fake tensors."""
    train = job.config.train
    rows = train.micro_batch_size * train.grad_acc
    inputs = torch.randint(0, job.shape.vocab_size, (rows, train.seq_len), device=mesh.device)
    labels = torch.randint(0, job.shape.vocab_size, (rows, train.seq_len), device=mesh.device)
    tokens = (labels >= 0).sum()
    dist.all_reduce(tokens, group=mesh.group("dp"))  # Stepper.run's global token count
    autocast = train.precision == "bf16" and not job.config.parallel.fsdp
    stepper = Stepper(model, mesh, job.schedule, train.grad_acc, autocast, pipeline=False)
    stepper.loss_fn.scale = 1.0 / rows / train.seq_len
    with loss_context(mesh.size("tp")), stepper.autocast:
        if mesh.size("pp") == 1:
            stepper.forward_backward(inputs, labels)
        else:
            _pipeline(job, mesh, model, stepper.loss_fn, inputs, labels, boundary)
    finish_grads(model.grads, train.grad_clip)


def _pipeline(
    job: Job,
    mesh: Mesh,
    model: ParallelModel,
    loss_fn: TokenLoss,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    boundary: dict[str, Any],
) -> None:
    """This rank's actions of the schedule, as torch's runtime runs them: each stage's forward
    keeps its graph until that micro-batch's backward; hidden states and their gradients go to
    the neighbouring stage's rank by send/recv on the pp group (or stay, on one rank)."""
    actions_of = getattr(job.schedule, "actions", None)
    if actions_of is None:
        raise UserError(
            f"pipeline.schedule: {job.config.pipeline.schedule!r} does not say its order of "
            "actions (PipelineSchedule.actions), which meshtrain plan needs"
        )
    pp, me = mesh.size("pp"), mesh.pp_rank
    holders = stage_ranks(job.schedule, pp)
    stages = dict(zip(model.stage_ids, model.stages, strict=True))
    micro_inputs = inputs.chunk(job.config.train.grad_acc)
    micro_labels = labels.chunk(job.config.train.grad_acc)
    group = mesh.group("pp")
    kept: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    local: dict[tuple[str, int, int], torch.Tensor] = {}  # handed between this rank's stages
    reduced: set[int] = set()

    def receive(kind: str, stage: int, micro: int, peer_stage: int, like: Any) -> torch.Tensor:
        if holders[peer_stage] == me:
            return local.pop((kind, stage, micro))
        shape, dtype = like
        tensor = torch.empty(shape, dtype=dtype, device=mesh.device)
        dist.recv(tensor, group=group, group_src=holders[peer_stage])
        return tensor

    def hand(kind: str, tensor: torch.Tensor, stage: int, micro: int) -> None:
        if holders[stage] == me:
            local[(kind, stage, micro)] = tensor.detach()
        else:
            dist.send(tensor.detach().contiguous(), group=group, group_dst=holders[stage])

    for action in actions_of(me, pp, job.config.train.grad_acc):
        kind, index, micro = action
        stage = stages[index]
        last = index == job.num_stages - 1
        if kind == "F":
            if index == 0:
                x = micro_inputs[micro]
            else:
                x = receive("F", index, micro, index - 1, boundary["hidden"]).requires_grad_()
            out = stage(x)
            if last:
                out = loss_fn(out, micro_labels[micro])
            else:
                boundary.setdefault("hidden", (tuple(out.shape), out.dtype))
                hand("F", out, index + 1, micro)
            kept[(index, micro)] = (x, out)
        elif kind in ("B", "I"):
            x, out = kept.pop((index, micro))
            _no_sync(stage)
            if last:
                out.backward()
            else:
                grad = receive("B", index, micro, index + 1, (tuple(out.shape), out.dtype))
                out.backward(grad)
            if index > 0:
                hand("B", x.grad, index - 1, micro)
        elif kind == "REDUCE_GRAD":
            _reduce_grad(stage)
            reduced.add(index)
    for index, stage in stages.items():  # the multi-stage runtimes reduce after the last action
        if index not in reduced:
            _reduce_grad(stage)


def _no_sync(stage: nn.Module) -> None:
    """What torch's stage does before every backward of an FSDP2 stage: keep the gathered
    weights and the unreduced gradients until REDUCE_GRAD."""
    if isinstance(stage, FSDPModule):
        stage.set_is_last_backward(False)
        stage.set_reshard_after_backward(False)
        stage.set_requires_gradient_sync(False)


def _reduce_grad(stage: nn.Module) -> None:
    """torch's `perform_reduce_grad` for an FSDP2 stage: reduce-scatter every unit's gradients."""
    if not isinstance(stage, FSDPModule):
        return
    stage.set_is_last_backward(True)
    stage.set_reshard_after_backward(True)
    stage.set_requires_gradient_sync(True)
    state = fully_shard.state(stage)
    for unit in state._state_ctx.all_states:
        for param_group in unit._fsdp_param_groups:
            param_group.post_backward()
    state._root_post_backward_final_callback()


def with_precision(job: Job, precision: str) -> Job:
    """`job` with train.precision set (the plan resolves "auto" before simulating)."""
    config = job.config
    train = dataclasses.replace(config.train, precision=precision)
    return dataclasses.replace(job, config=dataclasses.replace(config, train=train))
