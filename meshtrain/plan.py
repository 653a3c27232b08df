"""`meshtrain plan`: size a run before it starts, by simulating one step of its ranks.

    meshtrain plan configs/llama3_70b.toml --device-memory 80GiB \
        --compare "dp=16,pp=8,tp=8" "dp=32,pp=4,tp=8"

For each layout, `meshtrain.simulate` runs one step of the ranks that differ (one per pipeline
position) on fake tensors and a fake process group, so a world of thousands of ranks needs no
more than a handful of simulations. Per rank: peak memory by what it holds and the bytes of
collectives per axis; per layout: whether the largest rank fits the device.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from meshtrain.config import load_config
from meshtrain.errors import UserError
from meshtrain.simulate import RankSim

GIB = 2**30
CUDA_RUNTIME_BYTES = GIB
"""What a CUDA worker holds besides tensors, assumed: the CUDA context and kernels, NCCL's
buffers and the caching allocator's slack (about 1 GiB on recent GPUs and drivers)."""
SHORT_KEYS = {
    "dp": "parallel.dp",
    "pp": "parallel.pp",
    "tp": "parallel.tp",
    "ep": "parallel.ep",
    "dp_shard": "parallel.dp_shard",
    "sp": "parallel.sequence_parallel",
    "schedule": "pipeline.schedule",
    "grad_acc": "train.grad_acc",
    "mbs": "train.micro_batch_size",
    "ac": "train.activation_checkpointing",
}
UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": GIB, "tib": 2**40}
UNITS.update({"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "k": 2**10, "m": 2**20})
UNITS.update({"g": GIB, "t": 2**40})


@dataclass(frozen=True)
class LayoutPlan:
    """One layout's simulated step."""

    name: str
    """The layout as given to --compare (or "config")."""
    world: int
    dp: int
    pp: int
    tp: int
    ep: int
    schedule: str
    precision: str
    ranks: list[RankSim]
    runtime: int
    """Bytes a worker holds besides tensors (measured imports on CPU; an estimate on CUDA)."""

    @property
    def peak(self) -> int:
        """The largest rank's peak: tensors plus runtime."""
        return max(sim.peak_bytes for sim in self.ranks) + self.runtime

    def traffic(self, axis: str) -> int:
        """Bytes per step on `axis` of the busiest pp rank."""
        return max(
            (sim.traffic[axis].bytes for sim in self.ranks if axis in sim.traffic), default=0
        )


def parse_bytes(text: str) -> int:
    """'80GiB', '80 GB', '512M', '1.5TiB' or a plain byte count."""
    found = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    unit = found and found.group(2).lower()
    if not found or unit not in UNITS:
        raise UserError(f"--device-memory: {text!r} is not a size like 80GiB, 40GB or 512MiB")
    return int(float(found.group(1)) * UNITS[unit])


def layout_overrides(spec: str) -> list[str]:
    """'dp=16,pp=8,tp=8' -> ['parallel.dp=16', ...]; full dotted keys pass as they are."""
    items = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise UserError(f"--compare: {part!r} in {spec!r} is not KEY=VALUE (e.g. tp=8)")
        key = key.strip()
        items.append(f"{SHORT_KEYS.get(key, key)}={value.strip()}")
    return items


def plan_layouts(path: Path, overrides: list[str], compare: list[str]) -> list[LayoutPlan]:
    """Simulate the config (with `overrides`) once, or once per --compare layout. Every layout
    is checked before the first is simulated (a typo in the last one costs no minutes)."""
    from meshtrain.job import resolve_job

    specs = compare or [""]
    jobs = [
        resolve_job(load_config(path, overrides + layout_overrides(spec)), planning=True)
        for spec in specs
    ]
    return [plan_layout(job, spec or "config") for job, spec in zip(jobs, specs, strict=True)]


def plan_layout(job: Any, name: str) -> LayoutPlan:
    from meshtrain.precision import with_precision
    from meshtrain.simulate import simulate_job

    precision = _precision(job)
    sims = simulate_job(with_precision(job, precision))
    par = job.config.parallel
    cuda = job.device_type == "cuda"
    return LayoutPlan(
        name=name,
        world=job.config.world_size,
        dp=par.dp,
        pp=par.pp,
        tp=par.tp,
        ep=par.ep,
        schedule=job.config.pipeline.schedule if par.pp > 1 else "-",
        precision=precision,
        ranks=sims,
        runtime=CUDA_RUNTIME_BYTES if cuda else max(sim.imports for sim in sims),
    )


def _precision(job: Any) -> str:
    """train.precision with "auto" resolved for the run's device: bf16 on CUDA; on a CPU, what
    this machine would choose (the plan is usually made where the run will not happen, so say
    bf16 or fp32 explicitly to plan another machine)."""
    precision = job.config.train.precision
    if precision != "auto":
        return precision
    if job.device_type == "cuda":
        return "bf16"
    import torch

    from meshtrain.precision import choose

    return choose(torch.device("cpu"))[0]


def format_plans(plans: list[LayoutPlan], device_memory: int | None) -> str:
    lines = []
    for plan in plans:
        lines += _format_one(plan, device_memory) + [""]
    if len(plans) > 1:
        lines += _format_compare(plans, device_memory)
    return "\n".join(lines).rstrip()


def _format_one(plan: LayoutPlan, device_memory: int | None) -> list[str]:
    head = (
        f"layout {plan.name}: dp={plan.dp} pp={plan.pp} tp={plan.tp} ep={plan.ep} "
        f"({plan.world} ranks), schedule {plan.schedule}, {plan.precision}"
    )
    rows = [
        "pp rank   params     grads  optimizer  activations  temporaries   +runtime      total",
    ]
    for sim in plan.ranks:
        p = sim.peak
        rows.append(
            f"{sim.pp_rank:>7}  {_gib(p['params'])}  {_gib(p['grads'])}   {_gib(p['optimizer'])}"
            f"     {_gib(p['activations'])}     {_gib(p['temporaries'])}   {_gib(plan.runtime)}"
            f"  {_gib(sim.peak_bytes + plan.runtime)}"
        )
    rows.append("collectives per step and rank (calls, bytes) by axis:")
    for sim in plan.ranks:
        parts = [
            f"{axis} {t.calls} / {_size(t.bytes)}"
            for axis, t in sorted(sim.traffic.items())
            if t.calls
        ]
        rows.append(f"  pp rank {sim.pp_rank}: " + "; ".join(parts))
    folded = plan.ranks[0].extrapolated
    if folded:
        rows.append(
            f"(stages simulated at {folded[0]} and {folded[1]} layers per rank and extrapolated "
            "to their own count)"
        )
    rows.append(_verdict(plan, device_memory))
    return [head, *rows]


def _verdict(plan: LayoutPlan, device_memory: int | None) -> str:
    worst = max(plan.ranks, key=lambda sim: sim.peak_bytes)
    peak = f"peak {plan.peak / GIB:.2f} GiB per rank (pp rank {worst.pp_rank})"
    if device_memory is None:
        return f"verdict: {peak}; give --device-memory to check a device"
    share = plan.peak / device_memory
    if share <= 1:
        return f"verdict: fits: {peak} = {share:.0%} of {device_memory / GIB:.1f} GiB"
    return f"verdict: does NOT fit: {peak} = {share:.0%} of {device_memory / GIB:.1f} GiB"


def _format_compare(plans: list[LayoutPlan], device_memory: int | None) -> list[str]:
    width = max(len("layout"), *(len(plan.name) for plan in plans))  # names are never cut
    lines = [
        f"{'layout':<{width}}  ranks  peak/rank   fits     dp/step    pp/step    tp/step",
    ]
    for plan in plans:
        fits = "-" if device_memory is None else ("yes" if plan.peak <= device_memory else "NO")
        lines.append(
            f"{plan.name:<{width}}  {plan.world:>5}  {plan.peak / GIB:>6.2f} GiB  {fits:>4}"
            f"  {_size(plan.traffic('dp')):>10} {_size(plan.traffic('pp')):>10}"
            f" {_size(plan.traffic('tp')):>10}"
        )
    return lines


def plans_json(plans: list[LayoutPlan], device_memory: int | None) -> str:
    out = []
    for plan in plans:
        item = asdict(plan)
        item["ranks"] = [
            {
                "pp_rank": sim.pp_rank,
                "rank": sim.rank,
                "peak_bytes": sim.peak_bytes + plan.runtime,
                "tensor_bytes": sim.peak,
                "traffic": {axis: asdict(t) for axis, t in sim.traffic.items()},
                "extrapolated_from_layers": sim.extrapolated,
            }
            for sim in plan.ranks
        ]
        item["peak_bytes"] = plan.peak
        item["fits"] = None if device_memory is None else plan.peak <= device_memory
        out.append(item)
    return json.dumps(out, indent=2)


def _gib(value: int) -> str:
    return f"{value / GIB:>6.2f} GiB" if value >= GIB else f"{value / 2**20:>6.1f} MiB"


def _size(value: int) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"
