"""Evaluation during training: when `[eval]` asks for it, and the held-out loss over every target
token of the first `eval.steps` global batches (the same batches each time, in every layout).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from meshtrain import preflight

if TYPE_CHECKING:
    from meshtrain.train import Trainer


def eval_due(cfg: Any, step: int, saving: bool) -> bool:
    """Whether `[eval]` asks for an evaluation after `step`."""
    e = cfg.eval
    return (
        bool(e.every and step % e.every == 0)
        or (e.at_end and step == cfg.train.steps)
        or (e.at_checkpoint and saving)
    )


def evaluate(t: Trainer) -> dict:
    """The mean cross-entropy over every target token of the first `eval.steps` global batches
    of the held-out stream (the same batches at every evaluation, in every layout)."""
    cfg, mesh = t.job.config, t.mesh
    start = time.perf_counter()
    context = preflight.context(cfg, t.job.shape.vocab_size, mesh.dp_rank)
    stream = t.job.source.open_eval(t.job.data_options, context)
    summed = torch.zeros((), dtype=torch.float64, device=mesh.device)
    tokens = 0
    for _ in range(cfg.eval.steps):
        loss, count = t.stepper.evaluate(stream.next_batch())
        summed += loss.double()
        tokens += count
    # Only one rank per dp replica (last stage, tp rank 0) reports; the world sum is the dp sum.
    if not (t.model.last and mesh.tp_rank == 0):
        summed.zero_()
    dist.all_reduce(summed)
    loss = float(summed) / max(tokens, 1)
    return {
        "eval_loss": loss,
        "eval_ppl": math.exp(min(loss, 700.0)),
        "eval_tokens": tokens,
        "eval_time_s": time.perf_counter() - start,
    }
