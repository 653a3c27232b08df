"""What each pp rank holds, read from the model itself: the fallback of meshtrain/layout.py for a
family that does not declare `stage_parameters`.

The model is built on the meta device (no memory), cut with the same `pipeline.split_model` the
workers use and read through the same StagePlans the core applies, so the counts are exact; the
price is importing torch, torch.distributed.tensor and the model's code (seconds).
"""

from __future__ import annotations

import torch
from torch import nn

from meshtrain.contracts import StagePlan
from meshtrain.experts import expert_weight_ids
from meshtrain.job import Job
from meshtrain.pipeline import split_model
from meshtrain.tensor_parallel import shard_dims

Held = tuple[int, bool, str, bool]
"""(elements, expert, fsdp_unit, stepped): the fields of meshtrain.layout.Held, which imports
this module (not the other way round)."""


def held_by_rank(job: Job) -> list[list[Held]]:
    """What each pp rank holds (index: pp rank), from the meta model's stages and plans."""
    par = job.config.parallel
    model = _meta_model(job)
    return [_rank_held(job, model, job.schedule.placement(pp_i, par.pp)) for pp_i in range(par.pp)]


def count_meta_parameters(job: Job) -> int:
    """Parameters of the full meta model (tied parameters counted once)."""
    return sum(p.numel() for p in _meta_model(job).parameters())


def _meta_model(job: Job) -> nn.Module:
    with torch.device("meta"):
        return job.family.build(job.model_config)


def _rank_held(job: Job, model: nn.Module, ids: list[int]) -> list[Held]:
    par = job.config.parallel
    stages = split_model(
        job.family, model, job.shape.num_layers, ids, job.num_stages, job.seq_shards
    )
    plans = [job.family.plan(s, sequence_parallel=job.seq_shards > 1) for s in stages]
    split = _tp_split(stages, plans, par.tp)
    experts = expert_weight_ids(stages, plans)
    split.update(dict.fromkeys(experts, par.ep))
    units = {
        id(p): path
        for stage, plan in zip(stages, plans, strict=True)
        for path in plan.fsdp_units
        for p in stage.get_submodule(path).parameters()
    }
    named = [(n, p) for stage in stages for n, p in stage.named_parameters()]
    distinct = {id(p): p for _, p in named}
    # a tied copy whose source is on another rank: stepped there (meshtrain.grads.share_tied)
    here = {n for n, _ in named}
    tied = job.family.tied_parameters(job.model_config)
    unstepped = {
        id(p) for n, p in named for source, copy in tied if n == copy and source not in here
    }
    return [
        (
            -(-p.numel() // split.get(key, 1)),
            key in experts,
            units.get(key, ""),
            key not in unstepped,
        )
        for key, p in distinct.items()
    ]


def _tp_split(stages: list[nn.Module], plans: list[StagePlan], tp: int) -> dict[int, int]:
    """id(parameter) -> tp, for every parameter a tp style of the plans splits."""
    split: dict[int, int] = {}
    for stage, plan in zip(stages, plans, strict=True):
        for path, style in plan.tp.items():
            module = stage.get_submodule(path)
            for name in shard_dims(module, style, tp):
                split[id(module.get_parameter(name))] = tp
    return split
