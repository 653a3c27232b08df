"""The StagePlan of a LLaMA-layout decoder stage.

Tensor parallel is Megatron-style: q/k/v/gate/up split column-wise (output features), o/down
row-wise (input features), so each block needs one all-reduce forward and one backward. The
embedding is split over the vocabulary and the head column-wise with vocab-sharded logits, so the
loss runs under `loss_parallel` and no rank ever holds full-vocabulary logits. Per-head norms of q
and k (Qwen3) see only the local heads: their weights are replicated and their gradients summed
over tp. FSDP units and activation-checkpoint units are the decoder blocks.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)

from meshtrain.api import StagePlan, VocabParallelEmbedding


def build_plan(stage: nn.Module, *, sequence_parallel: bool, head_norms: bool) -> StagePlan:
    blocks = tuple(f"model.layers.{name}" for name in stage.model.layers)
    tp: dict[str, Any] = {}
    # Under sequence parallel, activations between blocks are sharded over the sequence (dim 1).
    between = Shard(1) if sequence_parallel else Replicate()
    if stage.first:
        tp["model.embed_tokens"] = VocabParallelEmbedding(output_layout=between)
    for prefix in blocks:
        tp.update(_block(prefix, between))
        if head_norms:  # (B, T, heads, head_dim): the local heads are a shard of dim 2
            for norm in ("q_norm", "k_norm"):
                tp[f"{prefix}.self_attn.{norm}"] = SequenceParallel(
                    sequence_dim=2, use_local_output=True
                )
        if sequence_parallel:
            tp.update(_sequence_parallel(prefix))
    if stage.last:
        if sequence_parallel:
            tp["model.norm"] = SequenceParallel()
        tp["lm_head"] = ColwiseParallel(
            input_layouts=between, output_layouts=Shard(-1), use_local_output=False
        )
    return StagePlan(tp=tp, fsdp_units=blocks, ac_units=blocks)


def _block(prefix: str, between: Any) -> dict[str, Any]:
    return {
        f"{prefix}.self_attn.q_proj": ColwiseParallel(),
        f"{prefix}.self_attn.k_proj": ColwiseParallel(),
        f"{prefix}.self_attn.v_proj": ColwiseParallel(),
        f"{prefix}.self_attn.o_proj": RowwiseParallel(output_layouts=between),
        f"{prefix}.mlp.gate_proj": ColwiseParallel(),
        f"{prefix}.mlp.up_proj": ColwiseParallel(),
        f"{prefix}.mlp.down_proj": RowwiseParallel(output_layouts=between),
    }


def _sequence_parallel(prefix: str) -> dict[str, Any]:
    return {
        f"{prefix}.input_layernorm": SequenceParallel(),
        f"{prefix}.post_attention_layernorm": SequenceParallel(),
        # hidden_states arrives as a keyword: gather the sequence before q/k/v.
        f"{prefix}.self_attn": PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": Shard(1)},
            desired_input_kwarg_layouts={"hidden_states": Replicate()},
        ),
        f"{prefix}.mlp": PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
        ),
    }
