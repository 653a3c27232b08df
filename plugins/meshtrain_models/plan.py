"""The StagePlan of a LLaMA-layout decoder stage.

Tensor parallel is Megatron-style: q/k/v/gate/up split column-wise (output features, biases with
them), o/down row-wise (input features), so attention and MLP each need one all-reduce forward
and one backward: q/k/v (gate/up) take one replicated DTensor input, whose summed gradient is
reduced once (torch's styles alone reduce each projection's: 5 backward all-reduces a block, 2
now). Key/value projections go through `KeyValueParallel`: split like q when tp divides the
key/value heads, replicated when there are fewer key/value heads than tp ranks (multi-query
attention), each rank then computing only the head its query heads use; `AttentionHeads` gives
the attention the matching head counts. Phi-3's fused projections ([Q | K | V], [gate | up]) go
through `FusedColwiseParallel`, which hands each rank its part of every block. The embedding is
split over the vocabulary (scaled by sqrt(hidden) where the model's embedding does so, as
Gemma's) and the head column-wise with vocab-sharded logits, so the loss (meshtrain.cross_entropy)
runs on each rank's columns and no rank ever holds full-vocabulary logits. Per-head norms of q and
k (Qwen3) see only the local heads: their weights are replicated and their gradients summed over
tp. FSDP units are the embedding, the decoder blocks and the head; activation-checkpoint units the
blocks.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)

from meshtrain.api import (
    ChannelShardedNorm,
    FusedColwiseParallel,
    KeyValueParallel,
    StagePlan,
    VocabParallelEmbedding,
    local_kv_groups,
)


def build_plan(stage: nn.Module, *, sequence_parallel: bool, qk_norms: str) -> StagePlan:
    blocks = tuple(f"model.layers.{name}" for name in stage.model.layers)
    tp: dict[str, Any] = {}
    # Under sequence parallel, activations between blocks are sharded over the sequence (dim 1).
    between = Shard(1) if sequence_parallel else Replicate()
    if stage.first:
        embedding = stage.model.embed_tokens
        style = ScaledVocabParallelEmbedding if hasattr(embedding, "embed_scale") else None
        tp["model.embed_tokens"] = (style or VocabParallelEmbedding)(output_layout=between)
    for prefix in blocks:
        attention = stage.get_submodule(f"{prefix}.self_attn")
        moe = hasattr(stage.get_submodule(f"{prefix}.mlp"), "experts")
        block = _block(prefix, between, attention)
        if sequence_parallel:
            block.update(_sequence_parallel(stage.get_submodule(prefix), prefix))
        # A mixture of experts is not split over tp but run by meshtrain.experts (moe.py).
        mlp = f"{prefix}.mlp"
        tp.update({k: v for k, v in block.items() if not (moe and k.startswith(mlp))})
        for norm in ("q_norm", "k_norm") if qk_norms else ():
            # Qwen3: (B, T, heads, head_dim), the local heads a shard of dim 2; OLMo2: over the
            # whole projection (B, T, heads * head_dim), whose statistics span every tp rank.
            tp[f"{prefix}.self_attn.{norm}"] = (
                SequenceParallel(sequence_dim=2, use_local_output=True)
                if qk_norms == "head"
                else ChannelShardedNorm()
            )
    if stage.last:
        if sequence_parallel:
            tp["model.norm"] = SequenceParallel()
        tp["lm_head"] = ColwiseParallel(
            input_layouts=between, output_layouts=Shard(-1), use_local_output=False
        )
    units = vocab_units(stage, "model.embed_tokens", "lm_head", blocks)
    kept = kept_units(stage, units, "lm_head")
    return StagePlan(tp=tp, fsdp_units=units, keep_gathered=kept, ac_units=blocks)


def vocab_units(stage: nn.Module, embedding: str, head: str, blocks: tuple) -> tuple[str, ...]:
    """FSDP2 units in execution order: the embedding, the blocks, the head. The vocabulary
    matrices are units of their own so they are gathered only around their own forward and
    backward, and the head's gradient is reduce-scattered right after its backward (in the
    stage's root unit it stayed gathered, with its full gradient, through the whole stage's
    backward: 2 x 192 MiB per rank in the reference run). An embedding and head sharing one weight
    in one stage (tied; the core ties them after this plan) stay in the root: FSDP2 refuses a
    parameter in two units."""
    if stage.first and stage.last and stage.config.tie_word_embeddings:
        return blocks
    return ((embedding,) if stage.first else ()) + blocks + ((head,) if stage.last else ())


def kept_units(stage: nn.Module, units: tuple[str, ...], head: str) -> tuple[str, ...]:
    """StagePlan.keep_gathered: the stage's last unit, where it is the head or the last block of
    a stage before the last (on the last stage the head and the loss follow its forward): each
    gathered once per micro-batch, not twice. In the reference run (the head on its last stage,
    block 2 on its first) neither rank's peak memory changed."""
    return units[-1:] if units and (units[-1] == head or not stage.last) else ()


def _block(prefix: str, between: Any, attention: nn.Module) -> dict[str, Any]:
    heads = attention.config.num_attention_heads
    kv_heads = attention.config.num_key_value_heads
    # The input of q/k/v (a keyword, hidden_states) and of gate/up becomes one replicated DTensor
    # before the projections (under sequence parallel, by a gather): backward sums their partial
    # input gradients and reduces them over tp once per module, not once per projection.
    replicated = PrepareModuleInput(
        input_kwarg_layouts={"hidden_states": between},
        desired_input_kwarg_layouts={"hidden_states": Replicate()},
    )
    styles = {
        f"{prefix}.self_attn": AttentionHeads(heads, kv_heads, replicated),
        f"{prefix}.self_attn.o_proj": RowwiseParallel(output_layouts=between),
        f"{prefix}.mlp": PrepareModuleInput(
            input_layouts=(between,), desired_input_layouts=(Replicate(),)
        ),
        f"{prefix}.mlp.down_proj": RowwiseParallel(output_layouts=between),
    }
    if hasattr(attention, "qkv_proj"):  # Phi-3: [Q | K | V] and [gate | up] in one Linear each
        width = attention.head_dim
        intermediate = attention.config.intermediate_size
        styles[f"{prefix}.self_attn.qkv_proj"] = FusedColwiseParallel(
            ((heads, width), (kv_heads, width), (kv_heads, width))
        )
        styles[f"{prefix}.mlp.gate_up_proj"] = FusedColwiseParallel(
            ((intermediate, 1), (intermediate, 1))
        )
        return styles
    key_value = KeyValueParallel(heads, kv_heads, attention.head_dim)
    return {
        **styles,
        f"{prefix}.self_attn.q_proj": ColwiseParallel(),
        f"{prefix}.self_attn.k_proj": key_value,
        f"{prefix}.self_attn.v_proj": key_value,
        f"{prefix}.mlp.gate_proj": ColwiseParallel(),
        f"{prefix}.mlp.up_proj": ColwiseParallel(),
    }


def _sequence_parallel(layer: nn.Module, prefix: str) -> dict[str, Any]:
    # The norms on the residual stream: pre-norm (LLaMA) or post-norm (OLMo2) blocks. A post-norm
    # output is added to the residual (a local shard) at once, so it must be local too.
    norms = ("input_layernorm", "post_attention_layernorm", "post_feedforward_layernorm")
    local = hasattr(layer, "post_feedforward_layernorm")
    return {
        f"{prefix}.{n}": SequenceParallel(use_local_output=local)
        for n in norms
        if hasattr(layer, n)
    }


class AttentionHeads(ParallelStyle):
    """On a transformers attention module: sets `num_key_value_groups` (query heads per key/value
    head, which `repeat_kv` and sdpa's GQA use) to what each tp rank holds, which differs from the
    model's when key/value projections are replicated (`KeyValueParallel`), and Phi-3's local
    head counts. Then applies `inner`, the style that makes its input one replicated DTensor."""

    def __init__(self, num_heads: int, num_kv_heads: int, inner: ParallelStyle):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.inner = num_heads, num_kv_heads, inner

    def shard_dims(self, module: nn.Module, tp: int) -> dict[str, int]:
        return {}

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        tp = device_mesh.size()
        module.num_key_value_groups = local_kv_groups(self.num_heads, self.num_kv_heads, tp)
        if hasattr(module, "qkv_proj"):
            # Phi-3 cuts its fused q/k/v output at config.num_attention_heads and
            # self.num_key_value_heads: give it this rank's counts (its own config copy).
            module.config = copy.copy(module.config)
            module.config.num_attention_heads = self.num_heads // tp
            module.num_key_value_heads = module.config.num_attention_heads // (
                module.num_key_value_groups
            )
        return self.inner._apply(module, device_mesh)


class ScaledVocabParallelEmbedding(VocabParallelEmbedding):
    """VocabParallelEmbedding for an embedding whose own forward multiplies its output by
    `embed_scale` in the weight's dtype (Gemma's sqrt(hidden_size)): it keeps doing so."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        module = super()._apply(module, device_mesh)
        module.forward = partial(_scaled, module, module.forward)
        return module


def _scaled(module: nn.Module, lookup: Any, ids: torch.Tensor) -> torch.Tensor:
    return lookup(ids) * module.embed_scale.to(module.weight.dtype)  # as transformers does
