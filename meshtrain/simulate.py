"""Simulate one training step of every pipeline position of a job (`meshtrain plan`).

    sims = simulate_job(job)   # one RankSim per pp rank (dp and tp peers are alike)

Each rank runs `fake_step.simulate_rank` in a fresh process (DTensor's caches compare meshes by
layout, so one simulated rank's world would leak into the next): pp rank 0 first, since the
others receive the hidden states it sends and need their shape, then the rest, two at a time on
two cores. The processes fork from a forkserver that has imported torch, transformers and the
model's code once. Long stages are simulated short and extrapolated (FOLD_AT).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import traceback
from typing import Any

from meshtrain.comms import Traffic
from meshtrain.errors import UserError, first_line
from meshtrain.fake_step import RankSim, simulate_rank
from meshtrain.job import Job, resolve_job
from meshtrain.stages import partition_layers

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
    if job.config.parallel.pp > 1 and not callable(getattr(job.schedule, "actions", None)):
        raise UserError(
            f"{job.config.path}: pipeline.schedule: {job.config.pipeline.schedule!r} does not "
            "say its order of actions (PipelineSchedule.actions), which meshtrain plan needs"
        )
    modules = _modules(job)
    imports = _measure_imports(["meshtrain.train", *modules])
    preload = ["meshtrain.simulate", *modules]
    sims = _simulate_folded(job, workers, preload) if fold else None
    sims = sims or _simulate_configs([job.config], workers, preload)[0]
    return [dataclasses.replace(sim, imports=imports()) for sim in sims]


def _measure_imports(modules: list[str]) -> Any:
    """Start a fresh process that imports `modules`; returns a function waiting for its resident
    bytes after the imports (a worker's baseline here; 0 if it failed)."""
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


def _simulate_folded(job: Job, workers: int, preload: list[str]) -> list[RankSim] | None:
    """FOLD_AT's two simulations extrapolated, for stages of more than FOLD_ABOVE layers."""
    config, stages = job.config, job.num_stages
    if job.shape.num_layers <= FOLD_ABOVE * stages:
        return None
    small, large = FOLD_AT
    short = [_with_layers(config, small * stages), _with_layers(config, large * stages)]
    try:  # a family whose config lists something per layer (layer_types) may refuse
        for one in short:
            resolve_job(one, planning=True)
    except UserError:
        return None
    one, two = _simulate_configs(short, workers, preload)
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
            sim, boundary = _result(first, 0)
            rest = [pool.submit(_simulate_rank_process, config, p, boundary) for p in range(1, pp)]
            results.append((sim, rest))
        return [
            [sim, *(_result(future, p)[0] for p, future in enumerate(rest, 1))]
            for sim, rest in results
        ]


class SimulationError(Exception):
    """A simulating process failed; args: (the error's last line, its traceback as text)."""


def _result(future: Any, pp_rank: int) -> Any:
    try:
        return future.result()
    except SimulationError as err:
        line, trace = err.args
        if os.environ.get("MESHTRAIN_DEBUG", "") not in ("", "0"):
            print(trace, file=sys.stderr)
        raise UserError(
            f"meshtrain plan: simulating pp rank {pp_rank} failed: {line} "
            "(MESHTRAIN_DEBUG=1 prints the traceback)"
        ) from None


def _modules(job: Job) -> list[str]:
    """The plugins' modules and those they declare their workers import (with torch and
    transformers, seconds to import): the forkserver imports them once and every simulating
    process starts from it."""
    names = [type(plugin).__module__ for plugin in (job.family, job.schedule, job.source)]
    return names + job.worker_imports


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
    """In a fresh process: the rank's RankSim and the hidden states' (shape, dtype) it saw. An
    error comes back as text (torch's errors do not all pickle)."""
    try:
        job = resolve_job(config, planning=True)
        found = {"hidden": boundary} if boundary else {}
        sim = simulate_rank(job, pp_rank, found)
    except Exception as err:
        line = first_line(err)
        line = line if isinstance(err, UserError) else f"{type(err).__name__}: {line}"
        raise SimulationError(line, traceback.format_exc()) from None
    return sim, found.get("hidden")
