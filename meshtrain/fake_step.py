"""One training step of one rank on a fake process group with fake tensors (`meshtrain plan`).

    sim = simulate_rank(job, pp_rank, boundary)   # in a process without a process group

The rank (dp 0, pp p, tp 0) of the job's full world joins torch's fake process group
(collectives return at once, nothing is sent), builds its part of the model with the workers' own
code (`build_parallel_model`: TP, experts, checkpointing, FSDP2) with parameters as fake tensors,
and runs one step: the micro-batches in the schedule's own order of actions, then `finish_grads`
and the optimizer. torch's MemTracker follows every tensor (peak bytes by category) and a
CommCounter every collective and point-to-point op (calls and bytes by mesh axis).

Where it differs from the run: a zero-bubble weight pass (W) is folded into its input pass (I),
so a schedule that splits backward keeps slightly less here; the interpreter, the process group
and the allocator are not tensors (`meshtrain plan` adds a measured import baseline).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.fsdp import FSDPModule, fully_shard

from meshtrain.comms import Traffic, axis_names
from meshtrain.experts import balanced_routing
from meshtrain.grads import finish_grads, share_tied
from meshtrain.job import Job
from meshtrain.layout import rank_of
from meshtrain.mem_tracking import StagingCounter, StepMemTracker, categories, total
from meshtrain.mesh import Mesh, init_mesh
from meshtrain.model import ParallelModel, build_parallel_model
from meshtrain.optim import build_optimizer
from meshtrain.pipeline import before_backward
from meshtrain.stages import stage_ranks
from meshtrain.step import Stepper, TokenLoss


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
        mesh = init_mesh(job.config, "cpu", "nccl" if job.device_type == "cuda" else "gloo")
        mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
        model = build_parallel_model(job, mesh, weights="none", materialize=mode)
        with mode:
            optimizer = _optimizer_with_state(model, job.config.train)
            tracker = StepMemTracker(model.stages)
            tracker.track_external(*model.stages, optimizer)
            staged = mesh.backend == "gloo"  # NCCL works in fixed buffers of its own
            counter = StagingCounter(axis_names(mesh, model.grads.ties), tracker, staged)
            with counter, StepMemTracker.skipping_shape_propagation(), balanced_routing():
                with tracker:
                    _step(job, mesh, model, boundary)
                # The fused AdamW of a run allocates nothing; its fake kernel would (a copy of
                # every list it updates), so it steps untracked.
                optimizer.step()
                share_tied(model.grads.ties)
                optimizer.zero_grad(set_to_none=True)
        peak = max(categories(tracker.get_tracker_snapshot("peak")), counter.peak, key=total)
    finally:
        dist.destroy_process_group()
    return RankSim(pp_rank=pp_rank, rank=rank, peak=peak, traffic=counter.totals())


def _optimizer_with_state(model: ParallelModel, train: Any) -> torch.optim.Optimizer:
    """The run's optimizer after one step: a step from the second on holds its moments through
    forward and backward, and that is the step that peaks."""
    optimizer = build_optimizer(model.stepped, train)
    for p in model.stepped:
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
    stepper = Stepper(
        model, mesh, job.schedule, train.grad_acc, autocast, False, job.sync_each_microbatch
    )
    stepper.loss_fn.scale = 1.0 / rows / train.seq_len
    with stepper.autocast:
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

    for action in job.schedule.actions(me, pp, job.config.train.grad_acc):
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
            before_backward(stage, job.sync_each_microbatch and kind == "B")
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
