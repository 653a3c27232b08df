"""Build this rank's part of the model: meta model -> stages -> tensor parallel -> weights -> dp.

Nothing full-sized is ever allocated: the model is built on the meta device, cut to this rank's
stages, sharded over tp, and only then given memory; FSDP2 (dp_shard) shards it further over dp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from meshtrain.data_parallel import apply_fsdp
from meshtrain.job import Job
from meshtrain.mesh import Mesh
from meshtrain.pipeline import split_model, stage_ids
from meshtrain.tensor_parallel import apply_tensor_parallel
from meshtrain.weights import init_weights, load_hf_weights, pretrained_folder


@dataclass
class ParallelModel:
    stages: list[nn.Module]
    """This rank's stage modules, in schedule order."""
    stage_ids: list[int]
    num_stages: int
    params: list[nn.Parameter]
    """Unique parameters of this rank, in a fixed order."""
    names: list[str]
    """Hugging Face names of `params`."""
    norm_weights: list[float]
    """Per parameter: 1 / number of ranks holding the same values (0 for a tied copy), so one
    world-wide sum of weighted squares gives the global gradient norm."""
    tied: list[nn.Parameter]
    """Parameters tied to one on another pipeline rank: their grads are summed over the pair."""

    @property
    def first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def last(self) -> bool:
        return self.num_stages - 1 in self.stage_ids


def build_parallel_model(job: Job, mesh: Mesh, *, weights: str = "init") -> ParallelModel:
    """This rank's stages with TP (and FSDP) applied. `weights`: "init" (from train.seed),
    "pretrained" (model.name's safetensors) or "none" (a checkpoint fills them later)."""
    par = job.config.parallel
    with torch.device("meta"):
        full = job.family.build(job.model_config)
    ids = stage_ids(mesh.pp_rank, par.pp, job.schedule.stages_per_rank)
    stages = split_model(job.family, full, job.shape.num_layers, ids, job.num_stages)
    del full
    tied = {copy: source for source, copy in job.family.tied_parameters(job.model_config)}
    for stage in stages:
        apply_tensor_parallel(
            stage, job.family, mesh.mesh["tp"], sequence_parallel=par.sequence_parallel
        )
        stage.to_empty(device=mesh.device)
        job.family.init_buffers(stage)
        _retie(stage, tied)
    if weights == "init":
        init_weights(stages, job.family, job.model_config, job.config.train.seed, tied)
    elif weights == "pretrained":
        load_hf_weights(stages, pretrained_folder(job.config.model.name), tied)
    if par.dp_shard and par.dp > 1:
        for stage in stages:
            apply_fsdp(stage, mesh.mesh["dp"])  # after init: FSDP2 swaps the Parameter objects
    return _collect(stages, ids, job.num_stages, mesh, tied)


def _retie(stage: nn.Module, tied: dict[str, str]) -> None:
    """parallelize_module and to_empty untie shared weights; tie them again within a stage."""
    for copy, source in tied.items():
        if _has(stage, copy) and _has(stage, source):
            owner, attr = _owner(stage, copy)
            setattr(owner, attr, stage.get_parameter(source))


def _collect(
    stages: list[nn.Module], ids: list[int], num_stages: int, mesh: Mesh, tied: dict[str, str]
) -> ParallelModel:
    params, names, weights, tied_params = [], [], [], []
    seen: set[int] = set()
    for stage in stages:
        for name, p in stage.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            in_pair = name in tied or name in tied.values()
            is_copy = name in tied and mesh.size("pp") > 1
            params.append(p)
            names.append(name)
            weights.append(0.0 if is_copy else 1.0 / _replicas(p, mesh))
            if in_pair and mesh.size("pp") > 1:
                tied_params.append(p)
    return ParallelModel(
        stages=stages,
        stage_ids=ids,
        num_stages=num_stages,
        params=params,
        names=names,
        norm_weights=weights,
        tied=tied_params,
    )


def _replicas(p: torch.Tensor, mesh: Mesh) -> int:
    sharded = set()
    if isinstance(p, DTensor):
        # Not placement.is_shard(): FSDP2 + TP's _StridedShard answers False to it in torch 2.13.
        sharded = {
            axis
            for axis, placement in zip(p.device_mesh.mesh_dim_names, p.placements, strict=True)
            if not (placement.is_replicate() or placement.is_partial())
        }
    return math.prod(mesh.size(axis) for axis in ("dp", "tp") if axis not in sharded)


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_parameter(name)
        return True
    except AttributeError:
        return False


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return module.get_submodule(path), attr
