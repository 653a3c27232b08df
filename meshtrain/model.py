"""Build this rank's part of the model: meta model -> the schedule's stages -> the family's plans
applied (meshtrain.parallelize) -> tied copies paired up for the gradient step.

Nothing full-sized is ever allocated: the model is built on the meta device, cut to this rank's
stages, sharded over tp, and only then given memory; FSDP2 (dp_shard) shards it further over dp.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from meshtrain.experts import expert_weight_ids
from meshtrain.grads import GradState, Reduction, Tie, stepped
from meshtrain.job import Job
from meshtrain.mesh import Mesh, pp_pair_groups
from meshtrain.parallelize import parallelize
from meshtrain.pipeline import split_model
from meshtrain.stages import stage_ranks
from meshtrain.weights import init_weights, load_hf_weights, pretrained_folder


@dataclass
class ParallelModel:
    stages: list[nn.Module]
    """This rank's stage modules, in the schedule's placement order."""
    stage_ids: list[int]
    num_stages: int
    grads: GradState
    """This rank's unique parameters and how to finish their gradients."""
    experts: list[tuple[nn.Module, Any]]
    """This rank's MoE blocks with their ExpertParallel (for the expert load metrics)."""

    @property
    def params(self) -> list[nn.Parameter]:
        return self.grads.params

    @property
    def stepped(self) -> list[nn.Parameter]:
        """What the optimizer steps: the params but tied copies (meshtrain.grads.share_tied)."""
        return stepped(self.grads)

    @property
    def first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def last(self) -> bool:
        return self.num_stages - 1 in self.stage_ids


def build_parallel_model(
    job: Job,
    mesh: Mesh,
    *,
    weights: str = "init",
    materialize: contextlib.AbstractContextManager | None = None,
) -> ParallelModel:
    """This rank's stages with the plan applied. `weights`: "init" (from train.seed),
    "pretrained" (model.name's safetensors) or "none" (a checkpoint fills them later).
    `materialize`: the context the stages get their memory in (`meshtrain plan`'s
    FakeTensorMode; none: real memory)."""
    cfg, family = job.config, job.family
    par = cfg.parallel
    with torch.device("meta"):
        full = family.build(job.model_config)
    ids = job.schedule.placement(mesh.pp_rank, par.pp)
    holders = _holders(job, full)
    stages = split_model(family, full, job.shape.num_layers, ids, job.num_stages, job.seq_shards)
    del full
    plans = [family.plan(stage, sequence_parallel=job.seq_shards > 1) for stage in stages]
    tied = {copy: source for source, copy in family.tied_parameters(job.model_config)}

    def fill(stages: list[nn.Module]) -> None:
        with materialize or contextlib.nullcontext():
            _fill(stages)

    def _fill(stages: list[nn.Module]) -> None:
        for stage in stages:
            stage.to_empty(device=mesh.device)
            family.init_buffers(stage)
            _retie(stage, tied)
        if weights == "init":
            init_weights(stages, family, job.model_config, cfg.train.seed, tied)
        elif weights == "pretrained":
            hf_keys = {k: v for plan in plans for k, v in plan.hf_keys.items()}
            load_hf_weights(stages, pretrained_folder(cfg.model.name), tied, hf_keys)

    parallelize(stages, plans, mesh, cfg, fill, job.reshard_after_forward)
    params, names = _unique_parameters(stages)
    ties = _ties(job, mesh, holders, dict(zip(names, params, strict=True)))
    norm = [
        0.0 if name in tied else 1.0 / _replicas(p, mesh)
        for name, p in zip(names, params, strict=True)
    ]
    grads = GradState(
        params=params,
        norm_weights=norm,
        ties=ties,
        reductions=_reductions(params, plans, stages, mesh, fsdp=par.fsdp),
    )
    experts = [
        (stage.get_submodule(path), style)
        for stage, plan in zip(stages, plans, strict=True)
        for path, style in plan.experts.items()
    ]
    return ParallelModel(
        stages=stages, stage_ids=ids, num_stages=job.num_stages, grads=grads, experts=experts
    )


def _reductions(
    params: list[nn.Parameter], plans: list, stages: list[nn.Module], mesh: Mesh, *, fsdp: bool
) -> list[Reduction]:
    """Replicated dp: dense gradients averaged over dp; expert weights summed over the ranks
    holding the same experts (edp) and divided by dp (see meshtrain.grads). FSDP2 averaged
    dense gradients over dp and expert ones over edp: those still need 1 / ep. (FSDP2's own
    gradient divide factor would do it, but as a PREMUL_SUM reduce-scatter gloo lacks.)"""
    expert_ids = expert_weight_ids(stages, plans)
    dp, ep = mesh.size("dp"), mesh.size("ep")
    dense = [p for p in params if id(p) not in expert_ids]
    experts = [p for p in params if id(p) in expert_ids]
    if fsdp:
        return [Reduction(experts, None, 1, ep)] if experts and ep > 1 else []
    reductions = [Reduction(dense, mesh.group("dp"), dp, dp)]
    if experts:
        reductions.append(Reduction(experts, mesh.group("edp"), mesh.size("edp"), dp))
    return reductions


def _holders(job: Job, full: nn.Module) -> dict[str, int]:
    """Tied parameter name -> the stage that holds it (every stage cut on meta; cheap)."""
    every = split_model(
        job.family,
        full,
        job.shape.num_layers,
        list(range(job.num_stages)),
        job.num_stages,
        job.seq_shards,
    )
    wanted = {name for pair in job.family.tied_parameters(job.model_config) for name in pair}
    return {
        name: index
        for index, stage in enumerate(every)
        for name, _ in stage.named_parameters(remove_duplicate=False)
        if name in wanted
    }


def _ties(
    job: Job, mesh: Mesh, holders: dict[str, int], mine: dict[str, nn.Parameter]
) -> list[Tie]:
    """Pair tied copies: locally when both sit on this pp rank in different stages, else over a
    group with the pp rank holding the other side. Shared within one stage: nothing to do."""
    ranks = stage_ranks(job.schedule, job.config.parallel.pp)
    pairs = job.family.tied_parameters(job.model_config)
    pp_pair = {(a, b): tuple(sorted((ranks[holders[a]], ranks[holders[b]]))) for a, b in pairs}
    groups = pp_pair_groups(mesh, sorted({p for p in pp_pair.values() if p[0] != p[1]}))
    ties = []
    for a, b in pairs:  # (source, copy)
        if holders[a] != holders[b] and (a in mine or b in mine):  # one stage: one Parameter
            ties.append(Tie(mine.get(a), mine.get(b), groups.get(pp_pair[a, b])))
    return ties


def _retie(stage: nn.Module, tied: dict[str, str]) -> None:
    """parallelize_module and to_empty untie shared weights; tie them again within a stage."""
    for copy, source in tied.items():
        if _has(stage, copy) and _has(stage, source):
            path, _, attr = copy.rpartition(".")
            setattr(stage.get_submodule(path), attr, stage.get_parameter(source))


def _unique_parameters(stages: list[nn.Module]) -> tuple[list[nn.Parameter], list[str]]:
    params, names, seen = [], [], set()
    for stage in stages:
        for name, p in stage.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
                names.append(name)
    return params, names


def _replicas(p: torch.Tensor, mesh: Mesh) -> int:
    sharded = set()
    if isinstance(p, DTensor):
        # Not placement.is_shard(): FSDP2 + TP's _StridedShard answers False to it in torch 2.13.
        sharded = {
            axis
            for axis, placement in zip(p.device_mesh.mesh_dim_names, p.placements, strict=True)
            if not (placement.is_replicate() or placement.is_partial())
        }
    # ep shards part of dp (dp = edp * ep): a weight split over ep is held by dp / ep ranks.
    held = mesh.size("dp") * mesh.size("tp")
    return held // math.prod(mesh.size(axis) for axis in sharded)


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_parameter(name)
        return True
    except AttributeError:
        return False
