"""The layout of a job over its ranks: coordinates, stages, parameters and memory per rank.

    rows = build_layout(job)          # one RankLayout per rank, for `meshtrain check`

Nothing here starts a process or allocates real memory: the model is built on the meta device and
cut with the same `pipeline.split_model` the workers use, so parameter counts are exact. Memory is
an estimate (see `estimate_memory`): fp32 training state plus activations plus a fixed baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from meshtrain.job import Job
from meshtrain.pipeline import partition_layers, split_model, stage_ids

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
    the root unit (embedding/head) and of up to 3 blocks (current, prefetched, reducing);
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
    par, shape = job.config.parallel, job.shape
    ids = stage_ids(pp_i, par.pp, job.schedule.stages_per_rank)
    stages = split_model(job.family, model, shape.num_layers, ids, job.num_stages)
    ranges = partition_layers(shape.num_layers, job.num_stages)
    params = local_parameters(job, stages)
    last = job.num_stages - 1 in ids
    memory = estimate_memory(
        job,
        params,
        sum(len(ranges[i]) for i in ids),
        pp_i,
        last=last,
        working=_working_params(job, stages, params),
    )
    return ids, [ranges[i] for i in ids], params, memory


def local_parameters(job: Job, stages: list[nn.Module]) -> int:
    """Parameters one rank stores for `stages`: weights in the tp plan divided by tp (2D weights
    are split; norms stay replicated), everything divided by dp under parallel.dp_shard."""
    par = job.config.parallel
    everything = [p for stage in stages for p in stage.parameters()]
    return _count(everything, _tp_sharded(job, stages), par.tp, par.dp if par.dp_shard else 1)


def _tp_sharded(job: Job, stages: list[nn.Module]) -> set[int]:
    """ids of the parameters the tp plan splits."""
    sharded: set[int] = set()
    for stage in stages:
        plan = job.family.tp_plan(stage, sequence_parallel=job.config.parallel.sequence_parallel)
        for path in plan:
            module = stage.get_submodule(path)
            sharded.update(id(p) for p in module.parameters(recurse=False) if p.dim() == 2)
    return sharded


def _count(params, sharded: set[int], tp: int, dp: int) -> int:
    """Elements per rank of the distinct `params`, split over tp where sharded and over dp."""
    unique = {id(p): p for p in params}
    return sum(
        _ceil_div(_ceil_div(p.numel(), tp) if key in sharded else p.numel(), dp)
        for key, p in unique.items()
    )


def _working_params(job: Job, stages: list[nn.Module], params: int) -> int:
    """Parameters' worth of transient full copies (see MemoryEstimate.working)."""
    par = job.config.parallel
    if not (par.dp_shard and par.dp > 1):
        return params if par.dp > 1 else 0
    sharded = _tp_sharded(job, stages)
    blocks = [
        b
        for stage in stages
        for m in stage.modules()
        if isinstance(m, nn.ModuleList | nn.ModuleDict)
        for b in m.children()
    ]
    sizes = [_count(b.parameters(), sharded, par.tp, 1) for b in blocks]
    everything = [p for stage in stages for p in stage.parameters()]
    root = _count(everything, sharded, par.tp, 1) - sum(sizes)
    return 2 * root + 3 * max(sizes, default=0)


def estimate_memory(
    job: Job, params: int, num_layers: int, pp_i: int, *, last: bool, working: int = 0
) -> MemoryEstimate:
    """Peak bytes on one rank of pp rank `pp_i` holding `num_layers` layers and `params`.

    Activations kept for backward, per token and layer, in fp32 floats (no recomputation):
      4*hidden      residual stream in and out of both RMSNorms (split over tp under
                    sequence parallel, else replicated)
      (2*hidden + 2*kv_dim + 4*intermediate) / tp
                    q, k, v, attention output, gate, up, silu(gate), silu(gate)*up
    which is 24 floats per hidden unit for a multi-head block with intermediate = 4*hidden, tp = 1.
    A 1F1B pipeline keeps up to min(grad_acc, pp - pp_rank) micro-batches in flight per stage
    (GPipe keeps all grad_acc; this estimate assumes 1F1B). Logits are (mbs, seq, vocab/tp)."""
    cfg, shape = job.config, job.shape
    par, train = cfg.parallel, cfg.train
    kv_dim = shape.hidden_size // shape.num_heads * shape.num_kv_heads
    replicated = 4 * shape.hidden_size / (par.tp if par.sequence_parallel else 1)
    split = (2 * shape.hidden_size + 2 * kv_dim + 4 * shape.intermediate_size) / par.tp
    tokens = train.micro_batch_size * train.seq_len
    in_flight = min(train.grad_acc, par.pp - pp_i)
    activations = int(tokens * num_layers * (replicated + split) * BYTES_FP32 * in_flight)
    logits = tokens * shape.vocab_size // par.tp * BYTES_FP32 * LOGITS_COPIES if last else 0
    return MemoryEstimate(
        state=params * STATE_BYTES_PER_PARAM,
        activations=activations,
        logits=logits,
        working=working * BYTES_FP32,
        baseline=WORKER_BASELINE_BYTES,
    )


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
