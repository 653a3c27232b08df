"""One training step's forward and backward, pipelined or not, with the global token-mean loss.

Each micro-batch's loss is sum(cross-entropy over its target tokens) * dp / (target tokens in the
whole global batch). Summed over micro-batches and averaged over dp (as the gradients are), that is
exactly the single-process mean over the global batch, whatever grad_acc, dp or pp.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from meshtrain.mesh import Mesh
from meshtrain.model import ParallelModel
from meshtrain.pipeline import build_pipeline_stages
from meshtrain.tensor_parallel import loss_context

IGNORE = -100


class TokenLoss:
    """Cross-entropy summed over target tokens, times `scale` (set per step)."""

    def __init__(self) -> None:
        self.scale = 1.0

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # logits (B, T, V), vocab-sharded DTensor under tp; labels (B, T)
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        return loss * self.scale


class Stepper:
    """Runs forward + backward of one global step on this rank."""

    def __init__(
        self,
        model: ParallelModel,
        mesh: Mesh,
        schedule_provider: Any,
        grad_acc: int,
        precision: str,
    ):
        self.model, self.mesh, self.grad_acc = model, mesh, grad_acc
        self.loss_fn = TokenLoss()
        self.schedule = None
        if mesh.size("pp") > 1:
            stages = build_pipeline_stages(
                model.stages, model.stage_ids, model.num_stages, mesh.device, mesh.group("pp")
            )
            self.schedule = schedule_provider.build(stages, grad_acc, self.loss_fn)
        self.autocast = (
            torch.autocast(mesh.device.type, dtype=torch.bfloat16)
            if precision == "bf16"
            else contextlib.nullcontext()
        )

    def run(self, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Forward + backward of this rank's rows of the global batch (n, T+1).

        Returns (this rank's loss contribution, global target tokens)."""
        batch = batch.to(self.mesh.device)
        inputs, labels = batch[:, :-1], batch[:, 1:]  # (n, T) each
        tokens = (labels != IGNORE).sum()
        dist.all_reduce(tokens, group=self.mesh.group("dp"))
        self.loss_fn.scale = self.mesh.size("dp") / max(int(tokens), 1)
        with loss_context(self.mesh.size("tp")), self.autocast:
            if self.schedule is None:
                loss = self._run_plain(inputs, labels)
            else:
                loss = self._run_pipeline(inputs, labels)
        return loss, int(tokens)

    def _run_plain(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        (stage,) = self.model.stages
        total = torch.zeros((), device=inputs.device)
        micro = list(zip(inputs.chunk(self.grad_acc), labels.chunk(self.grad_acc), strict=True))
        for index, (x, y) in enumerate(micro):
            if isinstance(stage, FSDPModule):  # reduce-scatter once, after the last micro-batch
                stage.set_requires_gradient_sync(index == len(micro) - 1)
            loss = self.loss_fn(stage(x), y)
            loss.backward()
            total += _plain(loss.detach())
        return total

    def _run_pipeline(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        args = (inputs,) if self.model.first else ()
        losses: list = []
        kwargs = {"target": labels, "losses": losses} if self.model.last else {}
        self.schedule.step(*args, return_outputs=False, **kwargs)
        total = torch.zeros((), device=inputs.device)
        for loss in losses:
            total += _plain(loss.detach())
        return total


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t
