"""The training loop, run by every worker: build, then step, log and checkpoint until done.

batch -> forward/backward (pipelined or not) -> dp grad sync -> tied grad sync
      -> global grad norm + clip -> AdamW + LR -> metrics -> checkpoint every N steps
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from meshtrain import checkpoint, liveness, preflight, resume
from meshtrain.comm_time import CommTimer, seconds_by_pp_rank
from meshtrain.comms import CommCounter, axis_names, by_pp_rank
from meshtrain.evaluate import eval_due, evaluate
from meshtrain.expert_stats import step_stats
from meshtrain.grads import finish_grads, share_tied
from meshtrain.job import Job
from meshtrain.mesh import Mesh, init_mesh
from meshtrain.metrics import MetricsLog, peak_flops, peak_memory_gib
from meshtrain.model import ParallelModel, build_parallel_model
from meshtrain.optim import build_lr_schedule, build_optimizer
from meshtrain.precision import resolve_precision
from meshtrain.prefetch import Prefetcher
from meshtrain.stages import describe_stages
from meshtrain.step import Stepper

log = logging.getLogger("meshtrain")


@dataclass
class Trainer:
    """Everything a step needs; built once per worker by `build_trainer`."""

    job: Job
    mesh: Mesh
    model: ParallelModel
    stepper: Stepper
    optimizer: torch.optim.Optimizer
    lr_schedule: Any
    data: Any
    peak_flops: float
    base_mem_gib: float
    """This process's memory before the model was built (imports, process group, mesh)."""
    step: int = 0


def run_worker(job: Job) -> list[dict]:
    """Train to `train.steps`; returns the metrics of every step this run took (on every rank)."""
    trainer = build_trainer(job)
    cfg, rank = job.config, trainer.mesh.rank
    hook = job.plugins.hook
    metrics_log = (
        MetricsLog(cfg.run_dir, cfg.train.steps, cfg.log.every, cfg.log.tensorboard)
        if rank == 0
        else None
    )
    hook.on_train_start(config=cfg, rank=rank)
    history: list[dict] = []
    try:
        while trainer.step < cfg.train.steps:
            history.append(run_step(trainer, metrics_log, len(history) + 1))
    finally:
        liveness.stop(forget=False)  # started by build_trainer; launch may still ask lost()
        trainer.data.close()
        if metrics_log:
            metrics_log.close()
    hook.on_train_end(config=cfg, rank=rank, metrics=history[-1] if history else {})
    return history


def run_step(t: Trainer, metrics_log: MetricsLog | None, steps_this_run: int) -> dict:
    """One step with what follows it: evaluation, metrics, hooks and the checkpoint."""
    cfg, rank, hook = t.job.config, t.mesh.rank, t.job.plugins.hook
    metrics = train_step(t)
    metrics["steps_this_run"] = steps_this_run
    every = cfg.checkpoint.every
    saving = bool(every) and (t.step % every == 0 or t.step == cfg.train.steps)
    if eval_due(cfg, t.step, saving):
        found = evaluate(t)
        metrics.update(found)
        hook.on_eval_end(config=cfg, rank=rank, step=t.step, metrics=found)
    if metrics_log:
        metrics_log.write(metrics)
    hook.on_step_end(config=cfg, rank=rank, step=t.step, metrics=metrics)
    if saving:
        path = save_checkpoint(t)
        hook.on_checkpoint_saved(config=cfg, rank=rank, step=t.step, path=path)
    return metrics


def build_trainer(job: Job) -> Trainer:
    mesh = init_mesh(job.config, job.device_type)
    base_mem_gib = peak_memory_gib(mesh.device)
    liveness.start()
    job = resolve_precision(job, mesh)
    cfg = job.config
    if mesh.rank == 0:
        for warning in job.warnings:
            log.warning(warning)
        log.info(
            "mesh dp=%d pp=%d tp=%d on %s; %s",
            cfg.parallel.dp,
            cfg.parallel.pp,
            cfg.parallel.tp,
            mesh.device,
            "; ".join(describe_stages(job.shape.num_layers, job.num_stages)),
        )
    resume_from = resume.find_resume(cfg)
    weights = "none" if resume_from else "pretrained" if cfg.model.pretrained else "init"
    model = build_parallel_model(job, mesh, weights=weights)
    optimizer = build_optimizer(model.stepped, cfg.train)
    context = preflight.context(cfg, job.shape.vocab_size, mesh.dp_rank)
    trainer = Trainer(
        job=job,
        mesh=mesh,
        model=model,
        stepper=Stepper(
            model,
            mesh,
            job.schedule,
            cfg.train.grad_acc,
            autocast=cfg.train.precision == "bf16" and not cfg.parallel.fsdp,
            sync_each_microbatch=job.sync_each_microbatch,
        ),
        optimizer=optimizer,
        lr_schedule=build_lr_schedule(optimizer, cfg.train),
        data=Prefetcher(job.source.open(job.data_options, context)),
        peak_flops=peak_flops(mesh, cfg.train.precision),
        base_mem_gib=base_mem_gib,
    )
    if resume_from is not None:
        load_checkpoint(trainer, resume_from)
    return trainer


def train_step(t: Trainer) -> dict:
    """One optimizer step; returns its global metrics (the same on every rank)."""
    cfg, shape = t.job.config, t.job.shape
    start, cpu_start = time.perf_counter(), time.process_time()
    batch = t.data.next_batch()
    counter = CommCounter(axis_names(t.mesh, t.model.grads.ties)) if cfg.log.comms else None
    timer = CommTimer(t.mesh.backend) if cfg.log.comm_time else None
    with timer or contextlib.nullcontext(), counter or contextlib.nullcontext():
        loss, tokens = t.stepper.run(batch)
        grad_norm = float(finish_grads(t.model.grads, cfg.train.grad_clip))
        lr = t.lr_schedule.get_last_lr()[0]
        t.optimizer.step()
        share_tied(t.model.grads.ties)
    t.lr_schedule.step()
    t.optimizer.zero_grad(set_to_none=True)
    t.step += 1
    stats = _global_stats(t, loss, cpu_start, t.data.wait_s)
    moe = {}
    if shape.num_experts:
        sequences = cfg.train.micro_batch_size * cfg.train.grad_acc * cfg.parallel.dp
        moe = step_stats(
            t.model.experts, shape.moe_layers, shape.num_experts, sequences, t.mesh.device
        )
    elapsed = time.perf_counter() - start
    # 6 FLOPs per matmul parameter and token (fwd + bwd) plus attention scores (PaLM, app. B).
    attention = 12 * shape.num_layers * shape.num_heads * shape.head_dim * cfg.train.seq_len
    flops = (6 * shape.matmul_params + attention) * tokens
    return {
        "step": t.step,
        "loss": stats["loss"],
        "grad_norm": grad_norm,
        "lr": lr,
        "tokens": tokens,
        "step_time_s": elapsed,
        "tokens_per_s": tokens / elapsed,
        "mfu": flops / elapsed / t.peak_flops,
        **stats["memory"],
        "cpu_s": stats["cpu_s"],
        "pp_busy_s": stats["pp_busy_s"],
        "data_wait_s": stats["data_wait_s"],
        **({"compile_s": _compile_seconds()} if cfg.train.compile else {}),
        **(by_pp_rank(counter, t.mesh) if counter else {}),
        **(seconds_by_pp_rank(timer, t.mesh) if timer else {}),
        **moe,
    }


def _compile_seconds() -> float:
    """Seconds this process spent compiling since the last call (torch.compile's own record):
    most in step 1, again wherever a new shape recompiles."""
    from torch._dynamo.utils import compilation_time_metrics

    total = sum(compilation_time_metrics.get("_compile.compile_inner", []))  # each frame's whole
    compilation_time_metrics.clear()
    return total


def _global_stats(t: Trainer, loss: torch.Tensor, cpu_start: float, wait_s: float) -> dict:
    """Loss, memory, CPU and compute time over the world, in two all-reduces. Per pp rank: the
    mean compute seconds (the rest of the step is its pipeline bubble) and the peak memory.
    The data wait is the longest any rank waited for its batch."""
    mesh, model = t.mesh, t.model
    pp, me = mesh.size("pp"), mesh.pp_rank
    # Only one rank per dp replica reports the loss, so the world-wide sum is the dp sum.
    reporter = model.last and mesh.tp_rank == 0
    share = float(loss) / mesh.size("dp") if reporter else 0.0
    mem = peak_memory_gib(mesh.device)
    summed = torch.zeros(4 + pp, dtype=torch.float64, device=mesh.device)
    summed[:4] = torch.tensor([share, mem, time.process_time() - cpu_start, t.base_mem_gib])
    summed[4 + me] = t.stepper.busy_s / (mesh.world // pp)
    dist.all_reduce(summed)
    peaks = torch.zeros(2 + 2 * pp, dtype=torch.float64, device=mesh.device)
    peaks[0] = peaks[1 + me] = mem
    peaks[1 + pp + me] = t.base_mem_gib
    peaks[-1] = wait_s
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    return {
        "loss": float(summed[0]),
        "cpu_s": float(summed[2]),
        "pp_busy_s": [round(float(v), 6) for v in summed[4:]],
        "memory": {
            "peak_mem_total_gib": float(summed[1]),
            "peak_mem_max_rank_gib": float(peaks[0]),
            "pp_peak_mem_gib": [round(float(v), 4) for v in peaks[1 : 1 + pp]],
            "base_mem_total_gib": float(summed[3]),
            "pp_base_mem_gib": [round(float(v), 4) for v in peaks[1 + pp : -1]],
        },
        "data_wait_s": float(peaks[-1]),
    }


def save_checkpoint(t: Trainer) -> Path:
    cfg = t.job.config
    meta = {
        "lr_schedule": t.lr_schedule.state_dict(),
        "shape": asdict(t.job.shape),
        "config": cfg.raw,
        "world": t.mesh.world,
        "layout": checkpoint.layout_of(cfg),
        "family": t.job.family_name,
    }
    rank_state = {"rng": torch.get_rng_state(), "data": t.data.state_dict()}
    return checkpoint.save(
        resume.checkpoints_dir(cfg), t.step, _states(t), rank_state, meta, cfg.checkpoint.keep
    )


def load_checkpoint(t: Trainer, path: Path) -> None:
    """Restore model, optimizer, LR schedule, step, data position and RNG from `path`."""
    meta, rank_state = checkpoint.load(path, _states(t), checkpoint.layout_of(t.job.config))
    t.step = int(meta["step"])
    checkpoint.restore_lr_schedule(t.lr_schedule, t.step)
    t.data.load_state_dict(rank_state["data"])
    torch.set_rng_state(rank_state["rng"])
    if t.mesh.rank == 0:
        log.info("resumed from %s at step %d", path, t.step)


def _states(t: Trainer) -> dict[str, Any]:
    tied = {copy: source for source, copy in t.job.family.tied_parameters(t.job.model_config)}
    return {
        "model": checkpoint.ModelState(t.model.stages, tied),
        "optim": checkpoint.OptimizerState(t.model.stages, t.optimizer, tied),
    }
