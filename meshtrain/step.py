"""One training step's forward and backward, pipelined or not, with the global token-mean loss.

Each micro-batch's loss is sum(cross-entropy over its target tokens) * dp / (target tokens in the
whole global batch). Summed over micro-batches and averaged over dp (as the gradients are), that is
exactly the single-process mean over the global batch, whatever grad_acc, dp or pp.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from meshtrain.contracts import IGNORE_INDEX, Batch
from meshtrain.cross_entropy import token_cross_entropy
from meshtrain.errors import UserError
from meshtrain.mesh import Mesh
from meshtrain.model import ParallelModel
from meshtrain.pipeline import build_pipeline_stages, forward_sweep
from meshtrain.stages import stage_ranks


class TokenLoss:
    """Cross-entropy summed over target tokens, times `scale` (set per step)."""

    def __init__(self) -> None:
        self.scale = 1.0

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # logits (B, T, V), vocab-sharded DTensor under tp; labels (B, T)
        return token_cross_entropy(logits, labels) * self.scale


class Stepper:
    """Runs forward + backward of one global step on this rank."""

    def __init__(
        self,
        model: ParallelModel,
        mesh: Mesh,
        schedule_provider: Any,
        grad_acc: int,
        autocast: bool,
        pipeline: bool = True,
        sync_each_microbatch: bool = False,
    ):
        self.model, self.mesh, self.grad_acc = model, mesh, grad_acc
        self.sync_each_microbatch = sync_each_microbatch
        """FSDP2 reduces gradients after every micro-batch (parallel.grad_sync)."""
        self.schedule_provider = schedule_provider
        self.loss_fn = TokenLoss()
        self.schedule = None
        self.busy_s = 0.0
        """Seconds of the last step this rank computed (forward/backward of its stages), so the
        rest of the step is pipeline bubble."""
        if mesh.size("pp") > 1 and pipeline:  # meshtrain plan runs the actions itself
            stages = build_pipeline_stages(
                model.stages,
                model.stage_ids,
                model.num_stages,
                mesh.device,
                mesh.group("pp"),
                sync_each_microbatch,
            )
            for stage in stages:
                self._time_compute(stage)
            self.schedule = schedule_provider.build(stages, grad_acc, self.loss_fn)
        # bf16 without FSDP2's mixed precision (which casts the gathered weights itself).
        self.autocast = (
            torch.autocast(mesh.device.type, dtype=torch.bfloat16)
            if autocast
            else contextlib.nullcontext()
        )

    def run(self, batch: Batch | torch.Tensor) -> tuple[torch.Tensor, int]:
        """Forward + backward of this rank's rows of the global batch.

        Returns (this rank's loss contribution, global target tokens)."""
        inputs, labels = as_batch(batch)
        inputs, labels = inputs.to(self.mesh.device), labels.to(self.mesh.device)  # (n, T) each
        tokens = (labels != IGNORE_INDEX).sum()
        dist.all_reduce(tokens, group=self.mesh.group("dp"))
        self.loss_fn.scale = self.mesh.size("dp") / max(int(tokens), 1)
        with self.autocast:
            loss = self.forward_backward(inputs, labels)
        return loss, int(tokens)

    def forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The step's micro-batches through this rank's stages, with `loss_fn.scale` set; returns
        this rank's loss contribution."""
        self.busy_s, start = 0.0, time.perf_counter()
        if self.schedule is None:
            loss = self._run_plain(inputs, labels)
            self.busy_s = time.perf_counter() - start
            return loss
        return self._run_pipeline(inputs, labels)

    def evaluate(self, batch: Batch | torch.Tensor) -> tuple[torch.Tensor, int]:
        """Forward only, in eval mode, through the same stages (and pipeline schedule).

        Returns (this rank's summed cross-entropy over its target tokens, zero off the last
        stage, global target tokens of the batch)."""
        inputs, labels = as_batch(batch)
        inputs, labels = inputs.to(self.mesh.device), labels.to(self.mesh.device)
        tokens = (labels != IGNORE_INDEX).sum()
        dist.all_reduce(tokens, group=self.mesh.group("dp"))
        self.loss_fn.scale = 1.0
        stages = self.model.stages
        for stage in stages:
            stage.eval()
        try:
            with torch.no_grad(), self.autocast:
                if self.schedule is None:
                    (stage,) = stages
                    total = torch.zeros((), device=inputs.device)
                    for x, y in zip(
                        inputs.chunk(self.grad_acc), labels.chunk(self.grad_acc), strict=True
                    ):
                        total += _plain(self.loss_fn(stage(x), y))
                elif getattr(self.schedule_provider, "evaluates", False):
                    args = (inputs,) if self.model.first else ()
                    losses: list = []
                    kwargs = {"target": labels, "losses": losses} if self.model.last else {}
                    self.schedule.eval(*args, **kwargs)
                    total = sum(
                        (_plain(loss) for loss in losses), torch.zeros((), device=inputs.device)
                    )
                else:
                    total = self._sweep(inputs, labels)
        finally:
            for stage in stages:
                stage.train()
                for module in stage.modules():  # drop weights gathered for the forward
                    if isinstance(module, FSDPModule):
                        module.reshard()
        return total, int(tokens)

    def _sweep(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Forward only without the schedule (see `forward_sweep`)."""
        total = torch.zeros((), device=inputs.device)
        targets = labels.chunk(self.grad_acc)

        def run_last(index: int, logits: torch.Tensor) -> None:
            nonlocal total
            total += _plain(self.loss_fn(logits, targets[index]))

        pp = self.mesh.size("pp")
        forward_sweep(
            dict(zip(self.model.stage_ids, self.model.stages, strict=True)),
            stage_ranks(self.schedule_provider, pp),
            self.mesh.group("pp"),
            list(inputs.chunk(self.grad_acc)),
            self.mesh.device,
            run_last,
        )
        return total

    def _time_compute(self, stage: Any) -> None:
        """Count the time `stage` spends in its forward and backward passes (the schedule's F, B,
        I and W actions; waiting for neighbours happens outside them)."""
        for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
            method = getattr(stage, name)

            def timed(*args: Any, _method: Any = method, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return _method(*args, **kwargs)
                finally:
                    self.busy_s += time.perf_counter() - start

            setattr(stage, name, timed)

    def _run_plain(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        (stage,) = self.model.stages
        total = torch.zeros((), device=inputs.device)
        micro = list(zip(inputs.chunk(self.grad_acc), labels.chunk(self.grad_acc), strict=True))
        for index, (x, y) in enumerate(micro):
            if isinstance(stage, FSDPModule):  # parallel.grad_sync: once, or every micro-batch
                last = index == len(micro) - 1
                stage.set_requires_gradient_sync(last or self.sync_each_microbatch)
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


def as_batch(value: Batch | torch.Tensor) -> Batch:
    """A stream's batch as (inputs, labels); a single (n, T + 1) tensor from an older stream is
    read as inputs [:, :-1] and labels [:, 1:]. Inputs are checked: a -100 label copied into the
    inputs would index the embedding out of range (or silently hit a zero row under tp)."""
    if isinstance(value, torch.Tensor):
        value = Batch(inputs=value[:, :-1], labels=value[:, 1:])
    if not isinstance(value, tuple) or len(value) != 2:
        raise UserError(
            f"data.source: next_batch() returned {type(value).__name__}, "
            "expected a meshtrain Batch(inputs, labels) or one (n, seq_len + 1) tensor"
        )
    inputs, labels = value
    if inputs.shape != labels.shape:
        raise UserError(
            f"data.source: a batch has inputs {tuple(inputs.shape)} but labels "
            f"{tuple(labels.shape)}; they must have one shape"
        )
    if bool((inputs < 0).any()):
        raise UserError(
            "data.source: a batch has negative input ids (a -100 label mask in the "
            "inputs?); mask labels only, e.g. with Batch(inputs, labels)"
        )
    return Batch(inputs=inputs, labels=labels)


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t
