"""GPT-NeoX (Pythia): a decoder that is not LLaMA-shaped.

Each block holds LayerNorms with biases, one fused `attention.query_key_value` whose output is laid
out per head ([q_h | k_h | v_h] for each head h, so a plain column split hands each tp rank whole
heads with their q, k and v), `attention.dense`, an MLP `dense_h_to_4h` -> gelu -> `dense_4h_to_h`
with biases, and either a parallel residual (x + attn(ln1(x)) + mlp(ln2(x)), Pythia) or the
sequential one. Rotary covers only the first `partial_rotary_factor` of each head. The head is an
untied Linear named `embed_out` in Hugging Face files (`lm_head` in the transformers 5 model).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)

from meshtrain.api import StagePlan, VocabParallelEmbedding
from meshtrain_models.family import DecoderFamily, reset_rotary
from meshtrain_models.options import rename_neox_keys
from meshtrain_models.plan import kept_units, vocab_units


class NeoxStage(nn.Module):
    """One pipeline stage of GPTNeoXForCausalLM, keeping its parameter names."""

    def __init__(
        self, model: nn.Module, layers: range, *, first: bool, last: bool, sequence_shards: int
    ):
        super().__init__()
        self.config = model.config
        self.gpt_neox = nn.Module()
        if first:
            self.gpt_neox.embed_in = model.gpt_neox.embed_in
            self.gpt_neox.emb_dropout = model.gpt_neox.emb_dropout
        self.gpt_neox.layers = nn.ModuleDict({str(i): model.gpt_neox.layers[i] for i in layers})
        if last:
            self.gpt_neox.final_layer_norm = model.gpt_neox.final_layer_norm
            self.lm_head = model.lm_head
        self.gpt_neox.rotary_emb = model.gpt_neox.rotary_emb
        self.first, self.last = first, last
        self.sequence_shards = sequence_shards

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq_len = x.shape[1] if self.first else x.shape[1] * self.sequence_shards
        h = self.gpt_neox.emb_dropout(self.gpt_neox.embed_in(x)) if self.first else x
        positions = torch.arange(seq_len, device=h.device).unsqueeze(0)  # (1, T)
        rotary = self.gpt_neox.rotary_emb(h, positions)  # cos, sin: (1, T, rotary dims)
        for layer in self.gpt_neox.layers.values():
            # sdpa is causal by itself: GPT-NeoX has no sliding window.
            h = layer(h, attention_mask=None, position_embeddings=rotary, position_ids=positions)
        if self.last:
            h = self.lm_head(self.gpt_neox.final_layer_norm(h))  # (B, T, V)
        return h


def neox_plan(stage: nn.Module, *, sequence_parallel: bool) -> StagePlan:
    blocks = tuple(f"gpt_neox.layers.{name}" for name in stage.gpt_neox.layers)
    between = Shard(1) if sequence_parallel else Replicate()
    gather = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    tp: dict[str, Any] = {}
    if stage.first:
        tp["gpt_neox.embed_in"] = VocabParallelEmbedding(output_layout=between)
    for prefix in blocks:
        tp.update(
            {
                f"{prefix}.attention.query_key_value": ColwiseParallel(),  # whole heads per rank
                f"{prefix}.attention.dense": RowwiseParallel(output_layouts=between),
                f"{prefix}.mlp.dense_h_to_4h": ColwiseParallel(),
                f"{prefix}.mlp.dense_4h_to_h": RowwiseParallel(output_layouts=between),
            }
        )
        if sequence_parallel:  # norms on sequence shards; attention and MLP gather their input
            for norm in ("input_layernorm", "post_attention_layernorm"):
                tp[f"{prefix}.{norm}"] = SequenceParallel()
            tp[f"{prefix}.attention"] = gather
            tp[f"{prefix}.mlp"] = gather
    if stage.last:
        if sequence_parallel:
            tp["gpt_neox.final_layer_norm"] = SequenceParallel()
        tp["lm_head"] = ColwiseParallel(
            input_layouts=between, output_layouts=Shard(-1), use_local_output=False
        )
    hf_keys = {"lm_head.weight": "embed_out.weight"} if stage.last else {}
    units = vocab_units(stage, "gpt_neox.embed_in", "lm_head", blocks)
    kept = kept_units(stage, units, "lm_head")
    return StagePlan(tp=tp, fsdp_units=units, keep_gathered=kept, ac_units=blocks, hf_keys=hf_keys)


class NeoxFamily(DecoderFamily):
    """`ModelFamily` for GPTNeoXForCausalLM; what it shares with the LLaMA layout (config parsing,
    init, export) comes from DecoderFamily."""

    def parse_config(
        self, options: Mapping[str, Any], *, name: str | None, trust_remote_code: bool, where: str
    ) -> tuple[Any, list[str]]:
        return super().parse_config(
            rename_neox_keys(options), name=name, trust_remote_code=trust_remote_code, where=where
        )

    def split(
        self, model: nn.Module, layers: range, *, first: bool, last: bool, sequence_shards: int
    ) -> nn.Module:
        return NeoxStage(model, layers, first=first, last=last, sequence_shards=sequence_shards)

    def plan(self, stage: nn.Module, *, sequence_parallel: bool) -> StagePlan:
        return neox_plan(stage, sequence_parallel=sequence_parallel)

    def init_buffers(self, stage: nn.Module) -> None:
        reset_rotary(stage.gpt_neox.rotary_emb, stage.config)
