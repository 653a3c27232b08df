"""Tensor-parallel plan for a Llama stage: Megatron-style column/row splits, vocab parallel ends.

q/k/v/gate/up are split column-wise (output features), o/down row-wise (input features), so each
block needs one all-reduce forward and one backward. The embedding is split over the vocabulary and
the head column-wise with vocab-sharded logits, so the loss runs under `loss_parallel` and no rank
ever holds full-vocabulary logits.
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

from meshtrain.tensor_parallel import VocabParallelEmbedding


def build_tp_plan(stage: nn.Module, *, sequence_parallel: bool) -> dict[str, Any]:
    # Under sequence parallel, activations between blocks are sharded over the sequence (dim 1).
    between = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, Any] = {}
    if stage.first:
        plan["model.embed_tokens"] = VocabParallelEmbedding(output_layout=between)
    for name in stage.model.layers:
        prefix = f"model.layers.{name}"
        plan.update(
            {
                f"{prefix}.self_attn.q_proj": ColwiseParallel(),
                f"{prefix}.self_attn.k_proj": ColwiseParallel(),
                f"{prefix}.self_attn.v_proj": ColwiseParallel(),
                f"{prefix}.self_attn.o_proj": RowwiseParallel(output_layouts=between),
                f"{prefix}.mlp.gate_proj": ColwiseParallel(),
                f"{prefix}.mlp.up_proj": ColwiseParallel(),
                f"{prefix}.mlp.down_proj": RowwiseParallel(output_layouts=between),
            }
        )
        if sequence_parallel:
            plan.update(
                {
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
            )
    if stage.last:
        if sequence_parallel:
            plan["model.norm"] = SequenceParallel()
        plan["lm_head"] = ColwiseParallel(
            input_layouts=between, output_layouts=Shard(-1), use_local_output=False
        )
    return plan
