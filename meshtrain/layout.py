"""The layout of a job over its ranks: coordinates, stages, parameters and memory per rank.

    rows = build_layout(job)          # one RankLayout per rank, for `meshtrain check`

Nothing here starts a process or allocates real memory: the model is built on the meta device,
cut with the same `pipeline.split_model` the workers use and read through the same StagePlans the
core applies, so parameter counts are exact. Memory is an estimate (see `estimate_memory`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from meshtrain.contracts import StagePlan
from meshtrain.experts import expert_weight_ids
from meshtrain.job import Job
from meshtrain.pipeline import partition_layers, split_model
from meshtrain.tensor_parallel import shard_dims

BYTES_FP32 = 4
STATE_BYTES_PER_PARAM = 4 * BYTES_FP32
"""fp32 parameter + gradient + AdamW's two moments."""
LOGITS_COPIES = 3
"""Logits, their log-softmax and its gradient are alive at once on the last stage."""
WORKER_BASELINE_BYTES = int(0.45 * 2**30)
"""Resident memory of one worker besides tensors: ~0.33 GiB measured after importing torch 2.13
(CPU), transformers and the plugins, plus room for the process group, tokenizer and allocator
slack. A CUDA context comes on top on GPUs."""


@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """Bytes per rank, by what they hold."""

    state: int
    activations: int
    logits: int
    working: int
    """Transient full-size copies: with dp_shard, the gathered weights and unsharded gradients of
    the root unit (embedding/head) and of up to 3 FSDP units (current, prefetched, reducing);
    replicated, the flat gradient buffer of the dp all-reduce."""
    baseline: int

    @property
    def total(self) -> int:
        return self.state + self.activations + self.logits + self.working + self.baseline


@dataclass(frozen=True, kw_only=True)
class RankLayout:
    """One rank's place in the mesh and what it holds."""

    rank: int
    dp: int
    pp: int
    tp: int
    stages: list[int]
    layers: list[range]
    params: int
    """Parameters this rank stores, after tp sharding (and dp sharding with parallel.dp_shard)."""
    memory: MemoryEstimate


def rank_of(dp_i: int, pp_i: int, tp_i: int, pp: int, tp: int) -> int:
    """Global rank of mesh coordinates (dp, pp, tp); tp is innermost."""
    return (dp_i * pp + pp_i) * tp + tp_i


def build_layout(job: Job) -> list[RankLayout]:
    """Every rank of the job, in rank order."""
    par = job.config.parallel
    with torch.device("meta"):
        model = job.family.build(job.model_config)
    per_pp = [_pp_rank_summary(job, model, pp_i) for pp_i in range(par.pp)]
    rows = []
    for dp_i in range(par.dp):
        for pp_i in range(par.pp):
            ids, ranges, params, memory = per_pp[pp_i]
            for tp_i in range(par.tp):
                rows.append(
                    RankLayout(
                        rank=rank_of(dp_i, pp_i, tp_i, par.pp, par.tp),
                        dp=dp_i,
                        pp=pp_i,
                        tp=tp_i,
                        stages=ids,
                        layers=ranges,
                        params=params,
                        memory=memory,
                    )
                )
    return rows


def count_parameters(job: Job) -> int:
    """Parameters of the full model (tied parameters counted once)."""
    with torch.device("meta"):
        model = job.family.build(job.model_config)
    return sum(p.numel() for p in model.parameters())


def _pp_rank_summary(job: Job, model: nn.Module, pp_i: int) -> tuple:
    """(stage ids, layer ranges, params, memory), the same for all tp and dp peers of `pp_i`."""
    par = job.config.parallel
    ids = job.schedule.placement(pp_i, par.pp)
    stages = split_model(
        job.family, model, job.shape.num_layers, ids, job.num_stages, job.seq_shards
    )
    plans = [job.family.plan(s, sequence_parallel=job.seq_shards > 1) for s in stages]
    ranges = partition_layers(job.shape.num_layers, job.num_stages)
    sizes, experts = _sizes(stages, plans, par.tp, par.ep)
    # FSDP2 shards dense weights over dp, expert weights (already split over ep) over edp.
    shards = {key: par.dp // par.ep if key in experts else par.dp for key in sizes}
    params = sum(-(-n // (shards[key] if par.fsdp else 1)) for key, n in sizes.items())
    memory = estimate_memory(
        job,
        params,
        sum(len(ranges[i]) for i in ids),
        pp_i,
        last=job.num_stages - 1 in ids,
        working=_working_params(job, stages, plans, sizes),
    )
    return ids, [ranges[i] for i in ids], params, memory


def _sizes(
    stages: list[nn.Module], plans: list[StagePlan], tp: int, ep: int
) -> tuple[dict[int, int], set[int]]:
    """id(parameter) -> elements this rank holds of it after tp and ep, over the distinct
    parameters; and the ids of the expert weights (split over ep)."""
    split: dict[int, int] = {}
    for stage, plan in zip(stages, plans, strict=True):
        for path, style in plan.tp.items():
            module = stage.get_submodule(path)
            for name in shard_dims(module, style, tp):
                split[id(module.get_parameter(name))] = tp
    experts = expert_weight_ids(stages, plans)
    split.update(dict.fromkeys(experts, ep))
    sizes = {
        id(p): -(-p.numel() // split.get(id(p), 1)) for stage in stages for p in stage.parameters()
    }
    return sizes, experts


def _total(sizes: dict[int, int], dp: int) -> int:
    return sum(-(-n // dp) for n in sizes.values())


def _working_params(
    job: Job, stages: list[nn.Module], plans: list[StagePlan], sizes: dict[int, int]
) -> int:
    """Parameters' worth of transient full copies (see MemoryEstimate.working)."""
    par = job.config.parallel
    if not par.fsdp:
        return _total(sizes, 1) if par.dp > 1 else 0
    units = [
        {id(p) for p in stage.get_submodule(path).parameters()}
        for stage, plan in zip(stages, plans, strict=True)
        for path in plan.fsdp_units
    ]
    unit_sizes = [sum(sizes[key] for key in unit) for unit in units]
    root = _total(sizes, 1) - sum(unit_sizes)
    return 2 * root + 3 * max(unit_sizes, default=0)


def estimate_memory(
    job: Job, params: int, num_layers: int, pp_i: int, *, last: bool, working: int = 0
) -> MemoryEstimate:
    """Peak bytes on one rank of pp rank `pp_i` holding `num_layers` layers and `params`.

    Activations kept for backward per token and layer come from the family (ModelShape): the
    replicated part is split over tp only under sequence parallel, the rest always. The schedule
    says how many micro-batches a rank keeps in flight. Full activation checkpointing keeps only
    each layer's input plus one layer being recomputed; selective keeps the tp-split part (the
    matmul outputs). Logits are (mbs, seq, vocab / tp), several copies alive on the last stage."""
    cfg, shape = job.config, job.shape
    par, train = cfg.parallel, cfg.train
    replicated = shape.activations_replicated / (par.tp if par.sequence_parallel else 1)
    split = shape.activations_split / par.tp
    per_layer = {
        "none": replicated + split,
        "selective": split + shape.hidden_size / par.tp,
        "full": shape.hidden_size / (par.tp if par.sequence_parallel else 1),
    }
    kept = per_layer[train.activation_checkpointing] * num_layers
    if train.activation_checkpointing != "none":
        kept += replicated + split  # the layer being recomputed
    tokens = train.micro_batch_size * train.seq_len
    in_flight = job.schedule.in_flight(pp_i, par.pp, train.grad_acc) if par.pp > 1 else 1
    activations = int(tokens * kept * BYTES_FP32 * in_flight)
    logits = tokens * shape.vocab_size // par.tp * BYTES_FP32 * LOGITS_COPIES if last else 0
    return MemoryEstimate(
        state=params * STATE_BYTES_PER_PARAM,
        activations=activations,
        logits=logits,
        working=working * BYTES_FP32,
        baseline=WORKER_BASELINE_BYTES,
    )
