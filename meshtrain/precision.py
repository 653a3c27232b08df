"""`train.precision = "auto"`: bf16 where the device computes it fast, else fp32.

    job = resolve_precision(job, mesh)     # in every worker, before the model is built

CUDA: bf16 where the GPU supports it. CPU: bf16 only where its measured bf16 matmul beats fp32
by a clear margin (AVX-512-bf16 or AMX: several times faster; without them bf16 is emulated and
slower). The launcher reads this machine's peaks (meshtrain.peaks) and hands the choice to its
workers ($MESHTRAIN_PRECISION), so they agree; workers started by torchrun or srun each read
them and take bf16 only if every rank chose it. An explicit "bf16" where it is slower runs,
with a one-line warning.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from meshtrain.peaks import matmul_peaks

log = logging.getLogger("meshtrain")

PRECISION_ENV = "MESHTRAIN_PRECISION"
"""The precision "auto" resolves to, when a launcher (or a test) already decided."""
MARGIN = 1.2
"""bf16 must be this much faster than fp32 for auto to choose it."""


def choose(device: Any) -> tuple[str, str]:
    """(the precision "auto" means on `device` (a torch.device or its type), the reason in
    words). torch is imported only for a GPU: a CPU's answer comes from its peaks."""
    if getattr(device, "type", device) == "cuda":
        import torch

        if torch.cuda.is_bf16_supported():
            return "bf16", f"{torch.cuda.get_device_name(device)} computes bf16 natively"
        return "fp32", f"{torch.cuda.get_device_name(device)} has no bf16 support"
    fp32, bf16 = matmul_peaks()
    ratio = bf16 / fp32
    speed = f"bf16 matmul {bf16 / 1e9:.1f} GFLOP/s = {ratio:.2f}x fp32 ({fp32 / 1e9:.1f}) here"
    return ("bf16" if ratio >= MARGIN else "fp32"), speed


def decide(config: Any, device_type: str) -> str:
    """Before workers start (the local launcher): resolve "auto" once and put the choice in the
    environment for them; warn about an explicit bf16 that is slower here."""
    precision = config.train.precision
    if precision == "auto" and PRECISION_ENV not in os.environ:
        choice, why = choose(device_type)
        os.environ[PRECISION_ENV] = choice
        log.info("train.precision auto -> %s: %s", choice, why)
    elif precision == "bf16" and device_type == "cpu":
        choice, why = choose(device_type)
        if choice == "fp32":
            log.warning("train.precision: bf16 is slower than fp32 on this CPU (%s)", why)
    return os.environ.get(PRECISION_ENV, precision) if precision == "auto" else precision


def resolve_precision(job: Any, mesh: Any) -> Any:
    """`job` with train.precision "auto" replaced by what every rank agrees on."""
    config = job.config
    if config.train.precision != "auto":
        return job
    choice = os.environ.get(PRECISION_ENV)
    if choice not in ("bf16", "fp32"):
        import torch
        import torch.distributed as dist

        choice, why = choose(mesh.device)
        vote = torch.tensor([choice == "bf16"], dtype=torch.int32, device=mesh.device)
        dist.all_reduce(vote, op=dist.ReduceOp.MIN)
        choice = "bf16" if int(vote) else "fp32"
        if mesh.rank == 0:
            log.info("train.precision auto -> %s: %s", choice, why)
    return with_precision(job, choice)


def with_precision(job: Any, precision: str) -> Any:
    """`job` with train.precision set to `precision`."""
    train = dataclasses.replace(job.config.train, precision=precision)
    return dataclasses.replace(job, config=dataclasses.replace(job.config, train=train))
