"""The layout of a job over its ranks: coordinates, stages, parameters and memory per rank.

    rows = build_layout(job)          # one RankLayout per rank, for `meshtrain check`

Nothing here starts a process, allocates memory or imports torch. Parameter counts are exact:
they come from the family's `stage_parameters` (each stage's parameters and their tp split,
declared from the model config), or, for a family that does not declare them, from its model
built on the meta device, cut by the same `split` and read through the same StagePlans the
workers use (meshtrain/meta_layout.py). Memory is an estimate (see `estimate_memory`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from meshtrain.contracts import ParamSpec
from meshtrain.job import Job
from meshtrain.stages import partition_layers

BYTES_FP32 = 4
STATE_BYTES_PER_PARAM = 4 * BYTES_FP32
"""fp32 parameter + gradient + AdamW's two moments."""
ADAMW_BYTES_PER_PARAM = 2 * BYTES_FP32
LOGITS_COPIES = 3
"""Logits, their log-softmax and its gradient are alive at once on the last stage; 2 under tp,
whose fused loss (meshtrain.cross_entropy) computes the softmax and then its gradient in one
buffer."""
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
    the root unit (embedding/head) and of up to 3 FSDP units (current, prefetched, reducing).
    Replicated over dp, nothing sizeable: gradients are reduced in place, small ones in buckets
    of at most 8 MiB (meshtrain.grads.average)."""
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


class Held(NamedTuple):
    """One distinct parameter a pp rank stores (a tied pair on one rank is one parameter)."""

    elements: int
    """On one rank, after the tp split (the ep split, for an expert weight)."""
    expert: bool
    fsdp_unit: str
    """The FSDP2 unit holding it; "" for a stage's root unit."""
    stepped: bool = True
    """False for a tied copy whose source is on another rank: no AdamW state here."""


HeldByRank = Callable[[Job], list[list[Held]]]
"""What each pp rank holds (index: pp rank), before dp sharding."""


def rank_of(dp_i: int, pp_i: int, tp_i: int, pp: int, tp: int) -> int:
    """Global rank of mesh coordinates (dp, pp, tp); tp is innermost."""
    return (dp_i * pp + pp_i) * tp + tp_i


def build_layout(job: Job, held_by_rank: HeldByRank | None = None) -> list[RankLayout]:
    """Every rank of the job, in rank order. `held_by_rank` defaults to the family's declared
    parameters where it has them (`declared_held`), else the meta-device model's."""
    par = job.config.parallel
    held = (held_by_rank or _held_source(job))(job)
    per_pp = [_pp_rank_summary(job, pp_i, held[pp_i]) for pp_i in range(par.pp)]
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
    if not _declares_parameters(job):
        from meshtrain.meta_layout import count_meta_parameters

        return count_meta_parameters(job)
    whole = job.family.stage_parameters(
        job.model_config,
        range(job.shape.num_layers),
        first=True,
        last=True,
        tp=1,
        sequence_parallel=False,
    )
    return sum(math.prod(spec.shape) for spec in _distinct(job, whole))


def declared_held(job: Job) -> list[list[Held]]:
    """What each pp rank holds, from the family's `stage_parameters`: no torch, no model."""
    par, family = job.config.parallel, job.family
    ranges, last = partition_layers(job.shape.num_layers, job.num_stages), job.num_stages - 1
    held = []
    for pp_i in range(par.pp):
        specs = [
            spec
            for i in job.schedule.placement(pp_i, par.pp)
            for spec in family.stage_parameters(
                job.model_config,
                ranges[i],
                first=i == 0,
                last=i == last,
                tp=par.tp,
                sequence_parallel=job.seq_shards > 1,
            )
        ]
        names = {spec.name for spec in specs}
        tied = job.family.tied_parameters(job.model_config)
        copies = {copy for source, copy in tied if source not in names}
        held.append([_held(spec, par.tp, par.ep, copies) for spec in _distinct(job, specs)])
    return held


def meta_held(job: Job) -> list[list[Held]]:
    """What each pp rank holds, from the family's model built on the meta device: the fallback
    for a family without `stage_parameters` (torch and the model's code load)."""
    from meshtrain.meta_layout import held_by_rank

    return [[Held._make(h) for h in rank] for rank in held_by_rank(job)]


def _declares_parameters(job: Job) -> bool:
    return callable(getattr(job.family, "stage_parameters", None))


def _held_source(job: Job) -> HeldByRank:
    return declared_held if _declares_parameters(job) else meta_held


def _distinct(job: Job, specs: list[ParamSpec]) -> list[ParamSpec]:
    """`specs` without the tied copies whose source is among them: one value, stored once."""
    source = {copy: first for first, copy in job.family.tied_parameters(job.model_config)}
    seen: set[str] = set()
    kept = []
    for spec in specs:
        key = source.get(spec.name, spec.name)
        if key not in seen:
            seen.add(key)
            kept.append(spec)
    return kept


def _held(spec: ParamSpec, tp: int, ep: int, copies: set[str]) -> Held:
    split = ep if spec.expert else tp if spec.tp_dim is not None else 1
    elements = -(-math.prod(spec.shape) // split)
    return Held(elements, spec.expert, spec.fsdp_unit, spec.name not in copies)


def _pp_rank_summary(job: Job, pp_i: int, held: list[Held]) -> tuple:
    """(stage ids, layer ranges, params, memory), the same for all tp and dp peers of `pp_i`."""
    par = job.config.parallel
    ids = job.schedule.placement(pp_i, par.pp)
    ranges = partition_layers(job.shape.num_layers, job.num_stages)
    # FSDP2 shards dense weights over dp, expert weights (already split over ep) over edp.
    stored = [
        -(-h.elements // ((par.dp // par.ep if h.expert else par.dp) if par.fsdp else 1))
        for h in held
    ]
    params = sum(stored)
    memory = estimate_memory(
        job,
        params,
        sum(len(ranges[i]) for i in ids),
        pp_i,
        last=job.num_stages - 1 in ids,
        working=_working_params(job, held),
        unstepped=sum(n for n, h in zip(stored, held, strict=True) if not h.stepped),
    )
    return ids, [ranges[i] for i in ids], params, memory


def _working_params(job: Job, held: list[Held]) -> int:
    """Parameters' worth of transient full copies (see MemoryEstimate.working)."""
    par = job.config.parallel
    if not par.fsdp:
        return 0
    total = sum(h.elements for h in held)
    units: Counter[str] = Counter()
    for h in held:
        if h.fsdp_unit:
            units[h.fsdp_unit] += h.elements
    root = total - sum(units.values())
    if par.pp > 1 and not job.sync_each_microbatch:  # torch's pipelining: a stage's weights
        return 2 * total  # stay gathered and its gradients whole from its first backward on
    return 2 * root + 3 * max(units.values(), default=0)


def estimate_memory(
    job: Job,
    params: int,
    num_layers: int,
    pp_i: int,
    *,
    last: bool,
    working: int = 0,
    unstepped: int = 0,
) -> MemoryEstimate:
    """Peak bytes on one rank of pp rank `pp_i` holding `num_layers` layers and `params`.

    Activations kept for backward per token and layer come from the family (ModelShape): the
    replicated part is split over tp only under sequence parallel, the rest always. The schedule
    says how many micro-batches a rank keeps in flight. Full activation checkpointing keeps only
    each layer's input plus one layer being recomputed; selective keeps the tp-split part (the
    matmul outputs). Logits are (mbs, seq, vocab / tp), several copies alive on the last stage.
    `unstepped` of the params (tied copies stepped on another rank) have no AdamW moments."""
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
    copies = LOGITS_COPIES - (par.tp > 1)
    logits = tokens * shape.vocab_size // par.tp * BYTES_FP32 * copies if last else 0
    return MemoryEstimate(
        state=params * STATE_BYTES_PER_PARAM - unstepped * ADAMW_BYTES_PER_PARAM,
        activations=activations,
        logits=logits,
        working=working * BYTES_FP32,
        baseline=WORKER_BASELINE_BYTES,
    )
