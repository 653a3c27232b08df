"""Run several training configs inside one spawned gloo world, so a test pays process start-up
once per world size instead of once per layout.

    results = run_world(4, [(config, ["parallel.dp=2", ...]), ...], tmp_path)
    results[i] = per-step metrics of run i (rank 0's view; every rank sees the same numbers)
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from meshtrain import malloc

WIDE = os.environ.get("MESHTRAIN_WIDE") == "1"
"""`make parity`: also the layouts the default run leaves out as covered by others' parts."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_tcmalloc() -> Any:
    """Processes started inside run on tcmalloc where it is installed, as `meshtrain run`'s
    workers do (meshtrain/malloc.py): the same math, without a third of the CPU going to page
    faults. The environment is restored after."""
    library = malloc.find_tcmalloc()
    return mock.patch.dict(os.environ, malloc.worker_env(library) if library else {})


def spawn_ranks(worker: Any, out: Path, world: int = 2) -> None:
    """`worker(rank, port, str(out), world)` in `world` spawned processes, joined (each writes
    into `out`)."""
    args = (free_port(), str(out), world)
    with on_tcmalloc():
        mp.start_processes(worker, args=args, nprocs=world, start_method="spawn", join=True)


def run_world(world: int, runs: list[tuple[str, list[str]]], out: Path) -> list[list[dict]]:
    """Train each (config, overrides) in turn in one world of `world` processes."""
    port = free_port()
    result = out / f"world{world}.json"
    with on_tcmalloc():
        mp.start_processes(
            _worker,
            args=(world, port, runs, str(result)),
            nprocs=world,
            start_method="spawn",
            join=True,
        )
    return json.loads(result.read_text())


def _worker(rank: int, world: int, port: int, runs: list, result: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    os.environ.setdefault("MESHTRAIN_PEAK_FLOPS", "1e11")
    torch.set_num_threads(1)
    from meshtrain.config import load_config
    from meshtrain.job import resolve_job
    from meshtrain.launch import prepare
    from meshtrain.train import run_worker

    dist.init_process_group("gloo")
    histories = []
    for path, overrides in runs:
        job = resolve_job(load_config(Path(path), overrides))
        if rank == 0:
            prepare(job)
        dist.barrier()
        histories.append(run_worker(job))
    if rank == 0:
        Path(result).write_text(json.dumps(histories))
    dist.destroy_process_group()


def worker_pids(run_dir: Path) -> dict[int, int]:
    """rank -> pid of the workers, found by the per-rank log file each holds open."""
    logs = {str(run_dir / "logs" / f"rank{r}.log"): r for r in range(8)}
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            targets = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except OSError:
            continue
        for target in targets:
            if target in logs:
                found[logs[target]] = int(proc.name)
    return found
