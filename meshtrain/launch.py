"""Start the world: join torchrun/srun, run a world of one in-process, or start local workers with
torch.distributed's elastic launcher (the engine behind torchrun) on 127.0.0.1.

    meshtrain run configs/tiny_cpu.toml --set parallel.dp=2     # 2 local workers
    torchrun --nproc-per-node 8 -m meshtrain run configs/smollm_cpu.toml
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import uuid
from pathlib import Path

from meshtrain import liveness, malloc, peaks
from meshtrain.config import config_from_raw
from meshtrain.errors import UserError
from meshtrain.job import Job, resolve_job

log = logging.getLogger("meshtrain")

STARTED, FINISHED, FAILED = "worker started", "worker finished", "worker failed"


def launch(job: Job) -> int:
    """Run `job` to completion; returns the exit status."""
    _slurm_to_torchrun_env()
    cfg = job.config
    if "RANK" in os.environ:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != cfg.world_size:
            raise UserError(
                f"{cfg.path}: parallel.dp * parallel.pp * parallel.tp = "
                f"{cfg.world_size} but the launcher started WORLD_SIZE={world} "
                "processes; change the degrees or --nproc-per-node"
            )
        if cfg.run.max_restarts and int(os.environ["RANK"]) == 0:
            log.warning(
                "run.max_restarts applies to meshtrain's own launcher; under torchrun "
                "pass --max-restarts to torchrun"
            )
        # Local rank 0 of each node prepares; the others wait in init_process_group meanwhile.
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            prepare(job)
        return _worker_main(str(cfg.path), cfg.raw)
    if cfg.world_size == 1:
        from meshtrain.precision import decide

        prepare(job)
        decide(cfg, job.device_type)
        return _worker_main(str(cfg.path), cfg.raw, job)
    return _launch_local(job)


def prepare(job: Job) -> None:
    """Once, before any worker starts: check the checkpoint to resume, tokenize the data."""
    from meshtrain.preflight import context
    from meshtrain.resume import check_resume

    check_resume(job)
    job.source.prepare(job.data_options, context(job.config, job.shape.vocab_size, dp_rank=0))


def _launch_local(job: Job) -> int:
    cfg = job.config
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # 8 workers x 2 threads on 2 cores: 10x slower
    library = malloc.choose(cfg.run.malloc, job.device_type)
    os.environ.update(malloc.worker_env(library))
    glibc = f"system (glibc; transparent huge pages: {malloc.huge_pages() or 'unknown'})"
    log.info("run.malloc %s -> %s", cfg.run.malloc, library or glibc)
    # Workers sharing the agent's TCPStore read the previous attempt's peer addresses after a
    # restart (pytorch/pytorch#135712: gloo "Connection refused"); a fresh store per attempt.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    cpu = job.device_type == "cpu"
    from meshtrain.precision import decide

    if cpu:
        peaks.matmul_peaks()  # from this machine's cache; or measured while nothing else runs
    decide(cfg, job.device_type)  # "auto" resolved once, for every worker
    if cpu:
        # Workers take the environment of the forkserver, as it is now. It imports what they
        # need on one core while this process imports torch, prepares the data and starts the
        # agent on the other.
        _start_forkserver(job)

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    prepare(job)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=cfg.world_size,
        run_id=f"meshtrain-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{_free_port()}",
        max_restarts=cfg.run.max_restarts,
        monitor_interval=0.5,
        start_method="forkserver" if cpu else "spawn",
        local_addr="127.0.0.1",
    )
    log.info(
        "starting %d local workers (dp=%d pp=%d tp=%d)",
        cfg.world_size,
        cfg.parallel.dp,
        cfg.parallel.pp,
        cfg.parallel.tp,
    )
    try:
        elastic_launch(config, _worker_main)(str(cfg.path), cfg.raw)
    except ChildFailedError as err:
        # The first rank to die takes its peers down with communication errors, and the agent
        # reports whichever failure it saw first: name the ranks that stopped silently first.
        silent = _silent_ranks(cfg.run_dir, cfg.world_size)
        for rank in silent:
            log.error(
                "rank %d failed: it stopped without a Python error (killed or crashed); see %s",
                rank,
                cfg.run_dir / "logs" / f"rank{rank}.log",
            )
        for rank, failure in sorted(err.failures.items()):
            if rank not in silent:
                log.error("rank %d failed: %s", rank, _failure_text(failure))
        return 1
    return 0


def _silent_ranks(run_dir: Path, world: int) -> list[int]:
    """Ranks whose log of the last attempt ends neither in "finished" nor "failed"."""
    silent = []
    for rank in range(world):
        path = run_dir / "logs" / f"rank{rank}.log"
        text = path.read_text() if path.is_file() else ""
        last = text[text.rfind(STARTED) :]
        if STARTED in last and FINISHED not in last and FAILED not in last:
            silent.append(rank)
    return silent


def _start_forkserver(job: Job) -> None:
    """On CPU workers are forked from one clean server process that imported torch,
    transformers, the plugins and the modules they declare (`worker_imports`) once, so that 8
    workers reach their first step in seconds instead of each importing everything again on 2
    cores. Unlike a fork of the launcher, workers inherit neither its heap (data preparation,
    tokenizer) nor its threads. CUDA workers are spawned."""
    import multiprocessing
    import multiprocessing.forkserver

    multiprocessing.set_forkserver_preload(
        [
            "torch",
            "transformers",
            "meshtrain.train",
            *job.plugins.module_names(),
            *job.worker_imports,
        ]
    )
    multiprocessing.forkserver.ensure_running()


def _worker_main(path: str, raw: dict, job: Job | None = None) -> int:
    """Entry point of every worker (also of the in-process world of one)."""
    import torch
    from torch.distributed.elastic.multiprocessing.errors import record

    from meshtrain.mesh import close_mesh
    from meshtrain.train import run_worker

    @record
    def main() -> int:
        nonlocal job
        job = job or resolve_job(config_from_raw(Path(path), raw))
        _setup_worker_logging(job.config.run_dir, int(os.environ.get("RANK", "0")))
        if job.device_type == "cpu" and "OMP_NUM_THREADS" in os.environ:
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        log.info("%s (pid %d, malloc %s)", STARTED, os.getpid(), malloc.loaded())
        try:
            run_worker(job)
        except BaseException as err:
            log.error("%s: %s", FAILED, err)
            lost = liveness.lost() if not isinstance(err, UserError) else ""
            if lost:
                log.error("%s", lost)
            raise
        finally:
            liveness.stop()
            close_mesh()
        log.info(FINISHED)
        return 0

    logger = logging.getLogger("meshtrain")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    try:
        return main()
    finally:  # the in-process world of one gives the caller its logging back
        for handler in list(logger.handlers):
            if handler not in saved[0]:
                handler.close()
        logger.handlers[:], logger.propagate, logger.level = saved


def _setup_worker_logging(run_dir: Path, rank: int) -> None:
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("meshtrain")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    file_handler = logging.FileHandler(logs / f"rank{rank}.log")
    file_handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s"))
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s"))
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.addHandler(file_handler)
    logger.addHandler(console)


def _failure_text(failure: object) -> str:
    message = getattr(failure, "message", "")
    if isinstance(message, dict):  # the error file written by @record
        message = message.get("message", "")
        message = message.get("message", message) if isinstance(message, dict) else message
    if not message:
        code = getattr(failure, "exitcode", "?")
        message = (
            f"exit code {code}"
            if isinstance(code, int) and code >= 0
            else f"killed by signal {getattr(failure, 'signal_name', lambda: -code)()}"
        )
    return str(message).strip().splitlines()[-1] if str(message).strip() else "unknown error"


def started_by_launcher() -> bool:
    """Whether torchrun or srun (one task per worker) started this process as one worker."""
    slurm = "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1
    return "RANK" in os.environ or slurm


def _slurm_to_torchrun_env() -> None:
    """Under srun, map Slurm's ids to the variables torch.distributed reads."""
    if "RANK" not in os.environ and started_by_launcher():
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        os.environ.setdefault("MASTER_PORT", "29500")
        if "MASTER_ADDR" not in os.environ:
            raise UserError(
                "under srun, set MASTER_ADDR to the first node's address (see configs/slurm.sbatch)"
            )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
