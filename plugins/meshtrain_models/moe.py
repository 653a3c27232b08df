"""Mixture-of-experts families over transformers 5's classes (Qwen3-MoE, Mixtral).

The blocks are LLaMA-shaped (family.py) except the MLP of an MoE layer: a router (`mlp.gate`,
weight (E, C)) and the experts packed into 3-D parameters (`mlp.experts.gate_up_proj` (E, 2I, C)
[gate | up], `mlp.experts.down_proj` (E, C, I)). The plan hands each such block to the core's
`ExpertParallel` (meshtrain.experts: routing, experts over parallel.ep, aux loss) instead of
splitting it over tp; attention, embedding and head are split as in every LLaMA-layout family.

Hugging Face checkpoints keep one tensor per expert and projection (Qwen3-MoE:
`mlp.experts.<e>.gate_proj.weight`; Mixtral: `block_sparse_moe.experts.<e>.w1.weight`, w1 gate,
w3 up, w2 down): the plan maps each packed parameter to them (`StackedKeys`), so each rank reads
only its own experts; `save_pretrained` writes the same layout back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from meshtrain.api import ExpertParallel, ModelShape, StackedKeys, StagePlan
from meshtrain_models.family import DecoderFamily, head_dim_of
from meshtrain_models.plan import build_plan


class MoeFamily(DecoderFamily):
    """A DecoderFamily whose layers may be mixtures of experts."""

    def parse_config(
        self, options: Mapping[str, Any], *, name: str | None, trust_remote_code: bool, where: str
    ) -> tuple[Any, list[str]]:
        config, problems = super().parse_config(
            options, name=name, trust_remote_code=trust_remote_code, where=where
        )
        if config is not None and getattr(config, "router_jitter_noise", 0.0):
            return None, [
                f"{where}.router_jitter_noise: {config.router_jitter_noise} is not supported: "
                "random noise on the router inputs would route tokens differently per layout; "
                "set it to 0"
            ]
        if config is not None and config.num_experts_per_tok > config.num_local_experts:
            return None, [
                f"{where}.num_experts_per_tok: {config.num_experts_per_tok} exceeds "
                f"the {config.num_local_experts} experts (model.num_experts)"
            ]
        return config, problems

    def shape(self, c: Any) -> ModelShape:
        dense = super().shape(c)
        moe = moe_layers(c)
        experts, top_k, width = c.num_local_experts, c.num_experts_per_tok, c.hidden_size
        expert_size = getattr(c, "moe_intermediate_size", c.intermediate_size)
        dense_layers = c.num_hidden_layers - len(moe)
        head_dim = head_dim_of(c)
        attention = width * 2 * (c.num_attention_heads + c.num_key_value_heads) * head_dim
        mlp = 3 * width * c.intermediate_size
        active = 3 * width * expert_size * top_k + width * experts
        # Kept for backward per token and layer: as a LLaMA block, with the MLP's share of
        # the dense layers and top_k experts' (gate, up, silu(gate), product) in MoE ones.
        per_layer_mlp = 4 * (c.intermediate_size * dense_layers + expert_size * top_k * len(moe))
        split = dense.activations_split - 4 * c.intermediate_size
        split += per_layer_mlp / c.num_hidden_layers + experts
        divisible = dict(dense.tp_divisible)
        if not dense_layers:
            divisible.pop("model.intermediate_size", None)
        return ModelShape(
            **{
                **dense.__dict__,
                "tp_divisible": divisible,
                "activations_split": split,
                "matmul_params": c.num_hidden_layers * attention
                + dense_layers * mlp
                + len(moe) * active
                + width * c.vocab_size,
                "num_experts": experts,
                "moe_layers": len(moe),
                "ep_divisible": {"model.num_experts": experts},
            }
        )

    def plan(self, stage: nn.Module, *, sequence_parallel: bool) -> StagePlan:
        plan = build_plan(stage, sequence_parallel=sequence_parallel, qk_norms=self.spec.qk_norms)
        c = stage.config
        ordinal = {layer: index for index, layer in enumerate(moe_layers(c))}
        coef = c.router_aux_loss_coef if c.output_router_logits else 0.0
        experts, hf_keys = {}, {}
        for name in stage.model.layers:
            if int(name) not in ordinal:
                continue
            prefix = f"model.layers.{name}.mlp"
            experts[prefix] = ExpertParallel(
                num_experts=c.num_local_experts,
                top_k=c.num_experts_per_tok,
                norm_topk_prob=getattr(c, "norm_topk_prob", True),
                layer=ordinal[int(name)],
                moe_layers=len(ordinal),
                aux_coef=coef,
                sequence_parallel=sequence_parallel,
            )
            hf_keys.update(self._hf_keys(prefix, c.num_local_experts))
        return StagePlan(**{**plan.__dict__, "experts": experts, "hf_keys": hf_keys})

    def _hf_keys(self, prefix: str, num_experts: int) -> dict[str, Any]:
        """The packed expert parameters of block `prefix` -> their per-expert checkpoint keys."""
        block, gate, up, down = self.spec.hf_experts
        where = prefix.rpartition(".")[0] + f".{block}"
        keys = {f"{prefix}.gate.weight": f"{where}.gate.weight"} if block != "mlp" else {}
        return {
            **keys,
            f"{prefix}.experts.gate_up_proj": StackedKeys(
                tuple(
                    (f"{where}.experts.{e}.{gate}.weight", f"{where}.experts.{e}.{up}.weight")
                    for e in range(num_experts)
                )
            ),
            f"{prefix}.experts.down_proj": StackedKeys(
                tuple((f"{where}.experts.{e}.{down}.weight",) for e in range(num_experts))
            ),
        }


def moe_layers(c: Any) -> list[int]:
    """Indices of the MoE layers: every layer (Mixtral), or as Qwen3-MoE's decoder picks them."""
    if not hasattr(c, "decoder_sparse_step"):
        return list(range(c.num_hidden_layers))
    return [
        i
        for i in range(c.num_hidden_layers)
        if i not in c.mlp_only_layers
        and c.num_local_experts > 0
        and (i + 1) % c.decoder_sparse_step == 0
    ]
