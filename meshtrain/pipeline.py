"""Pipeline parallel: the stage modules cut from the model, and the `torch.distributed.pipelining`
glue. Which layers each stage holds and where the schedule places it is plain arithmetic, in
meshtrain/stages.py (`meshtrain check` reads it without torch).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from meshtrain.stages import partition_layers


def split_model(
    family: Any,
    model: nn.Module,
    num_layers: int,
    ids: list[int],
    num_stages: int,
    sequence_shards: int = 1,
) -> list[nn.Module]:
    """Stage modules `ids`, cut from the full (meta) model by the family."""
    ranges = partition_layers(num_layers, num_stages)
    return [
        family.split(
            model,
            ranges[i],
            first=i == 0,
            last=i == num_stages - 1,
            sequence_shards=sequence_shards,
        )
        for i in ids
    ]


def build_pipeline_stages(
    stages: list[nn.Module],
    ids: list[int],
    num_stages: int,
    device: torch.device,
    group: Any,
    sync_each_microbatch: bool = False,
) -> list[Any]:
    """Wrap stage modules for the schedule; shapes are inferred on the first step (a forward
    on empty tensors that MoE metrics must not count). `sync_each_microbatch`: FSDP2 reduces
    gradients after every micro-batch (parallel.grad_sync), not once at REDUCE_GRAD."""
    from meshtrain.expert_stats import uncounted

    kind = _stage_class(sync_each_microbatch)
    wrapped = []
    for module, index in zip(stages, ids, strict=True):
        stage = kind(module, index, num_stages, device, group=group)
        infer = getattr(stage, "_forward_metadata_inference", None)  # torch 2.13's name
        if infer is not None:
            stage._forward_metadata_inference = _wrapped(infer, uncounted)
        wrapped.append(stage)
    return wrapped


def before_backward(stage: nn.Module, sync_each_microbatch: bool) -> None:
    """FSDP2's flags before one micro-batch's backward of a stage. torch's runtime: keep the
    gathered weights and the full-size gradients until the step's REDUCE_GRAD. Each
    micro-batch: FSDP2's defaults, each unit reshards and reduce-scatters after its backward
    (the sharded gradients accumulate; REDUCE_GRAD then finds nothing left to reduce)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(stage, FSDPModule):
        stage.set_is_last_backward(sync_each_microbatch)
        stage.set_reshard_after_backward(sync_each_microbatch)
        stage.set_requires_gradient_sync(sync_each_microbatch)


def _stage_class(sync_each_microbatch: bool) -> Any:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining._backward import stage_backward

    if not sync_each_microbatch:
        return PipelineStage

    class SyncingStage(PipelineStage):
        """torch's stage, whose full backward of an FSDP2 stage reduces every micro-batch
        (torch 2.13's `backward_maybe_with_nosync` hard-codes the no-sync flags)."""

        def backward_maybe_with_nosync(
            self, backward_type: str, bwd_kwargs: dict, last_backward: bool = False
        ) -> Any:
            if backward_type != "full" or not isinstance(self.submod, FSDPModule):
                return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward)
            before_backward(self.submod, True)
            grads = stage_backward(
                bwd_kwargs["stage_output"], bwd_kwargs["output_grads"], bwd_kwargs["input_values"]
            )
            return grads, None

    return SyncingStage


def _wrapped(method: Any, context: Any) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        with context():
            return method(*args, **kwargs)

    return run


def forward_sweep(
    stages: dict[int, nn.Module],
    holders: dict[int, int],
    group: Any,
    micro_inputs: list[torch.Tensor],
    device: torch.device,
    run_last: Any,
) -> None:
    """Forward only, one micro-batch at a time through every stage in order: for schedules whose
    own `eval()` cannot skip backward (the V schedules). `stages`: this rank's stage modules by
    id; `holders`: stage id -> pp rank; `micro_inputs`: token ids per micro-batch (used by the
    first stage); `run_last(index, output)` takes the last stage's output of micro-batch
    `index`. Every pp rank walks the stages in the same order, so each send meets its receive."""
    import torch.distributed as dist

    me, last = dist.get_rank(group), max(holders)
    for index, inputs in enumerate(micro_inputs):
        hidden = inputs
        for stage in range(last + 1):
            source, target = holders.get(stage - 1), holders[stage]
            if stage > 0 and source != target:
                if me == source:
                    _send(hidden, group, target)
                elif me == target:
                    hidden = _recv(group, source, device)
            if me == target:
                hidden = stages[stage](hidden)
        if me == holders[last]:
            run_last(index, hidden)


def _send(tensor: torch.Tensor, group: Any, target: int) -> None:
    """A header (rank, dtype, shape) then the tensor: the receiver needs no shape inference."""
    import torch.distributed as dist

    tensor = tensor.contiguous()
    header = torch.zeros(8, dtype=torch.int64, device=tensor.device)
    header[0], header[1] = tensor.dim(), _DTYPES.index(tensor.dtype)
    header[2 : 2 + tensor.dim()] = torch.tensor(tensor.shape)
    dist.send(header, group=group, group_dst=target)
    dist.send(tensor, group=group, group_dst=target)


def _recv(group: Any, source: int, device: torch.device) -> torch.Tensor:
    import torch.distributed as dist

    header = torch.zeros(8, dtype=torch.int64, device=device)
    dist.recv(header, group=group, group_src=source)
    ndim, dtype = int(header[0]), _DTYPES[int(header[1])]
    tensor = torch.empty(header[2 : 2 + ndim].tolist(), dtype=dtype, device=device)
    dist.recv(tensor, group=group, group_src=source)
    return tensor


_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
