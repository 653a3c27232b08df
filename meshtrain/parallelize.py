"""Apply a family's StagePlans: tensor parallel -> experts -> activation checkpointing -> compile
-> weights -> FSDP2.

    parallelize(stages, plans, mesh, config, fill=load_weights)

The one place where the core changes the model for parallelism. Tensor parallel is applied on the
meta device (nothing full-sized is ever allocated); `fill` then gives the stages memory and their
weights; FSDP2 comes last, because it swaps the Parameter objects and shards over dp.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor.parallel import parallelize_module
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from meshtrain.config import Config
from meshtrain.contracts import StagePlan
from meshtrain.fsdp_comms import use_gloo_comms
from meshtrain.mesh import Mesh

SAVED_OPS = {  # "selective": keep the outputs of these ops, recompute the cheap rest
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
}


def parallelize(
    stages: list[nn.Module],
    plans: list[StagePlan],
    mesh: Mesh,
    config: Config,
    fill: Callable[[list[nn.Module]], None],
    reshard_after_forward: str = "all",
) -> None:
    """Shard `stages` (meta modules) in place; `fill` materialises them after tensor parallel."""
    mode, tp_mesh = config.train.activation_checkpointing, mesh.axis("tp")
    sequences = config.train.micro_batch_size * config.train.grad_acc
    for stage, plan in zip(stages, plans, strict=True):
        if tp_mesh.size() > 1 and plan.tp:
            parallelize_module(stage, tp_mesh, dict(plan.tp))
        for path, style in plan.experts.items():
            style.apply(stage.get_submodule(path), mesh.mesh["ep", "tp"], sequences)
        if mode != "none":
            for path in plan.ac_units:
                apply_checkpointing(stage.get_submodule(path), selective=mode == "selective")
        if config.train.compile:  # each block on its own: one graph, reused by every block
            for path in plan.ac_units:
                stage.get_submodule(path).compile()
    fill(stages)
    if config.parallel.fsdp:
        for stage, plan in zip(stages, plans, strict=True):
            apply_fsdp(stage, plan, mesh, config.train.precision, reshard_after_forward)


def apply_checkpointing(module: nn.Module, *, selective: bool) -> None:
    """Recompute `module`'s forward in backward. Its forward is wrapped in place (not the module),
    so parameter names stay those of the checkpoint."""
    context = partial(create_selective_checkpoint_contexts, _policy) if selective else None
    extra = {"context_fn": context} if context else {}
    module.forward = partial(checkpoint, module.forward, use_reentrant=False, **extra)


def _policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_fsdp(stage: nn.Module, plan: StagePlan, mesh: Mesh, precision: str, reshard: str) -> None:
    """FSDP2 over dp: each unit of the plan, then the stage as the root unit (the rest). The
    experts of each MoE block first, over the dp ranks holding the same experts (edp); their
    gradients come out averaged over edp (finish_grads divides them by ep too). `reshard`: the
    units that free their gathered weights after forward (Job.reshard_after_forward)."""
    policy, dp_mesh = mixed_precision(precision), mesh.axis("dp")
    units = [
        fully_shard(
            stage.get_submodule(path).experts,
            mesh=mesh.axis("edp"),
            mp_policy=policy,
            reshard_after_forward=reshard != "none",
        )
        for path in plan.experts
    ]
    for path in plan.fsdp_units:
        module = stage.get_submodule(path)
        free = reshard == "all" or (reshard == "undeclared" and path not in plan.keep_gathered)
        units.append(
            fully_shard(module, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=free)
        )
        if isinstance(module, nn.Embedding):  # a lookup's backward needs no weights
            units[-1].set_unshard_in_backward(False)
    # The root: None lets FSDP2 keep it gathered after forward, since backward starts with it.
    units.append(fully_shard(stage, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=None))
    if mesh.backend == "gloo":  # meshtrain.fsdp_comms: without gloo's staging copies
        for unit in units:
            use_gloo_comms(unit)


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """bf16: gather and compute in bf16, reduce gradients and keep master weights in fp32."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()
