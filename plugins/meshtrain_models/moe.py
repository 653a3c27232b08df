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

from meshtrain.api import ExpertParallel, StackedKeys, StagePlan
from meshtrain_models.family import DecoderFamily
from meshtrain_models.plan import build_plan
from meshtrain_models.shapes import moe_layers, moe_problems


class MoeFamily(DecoderFamily):
    """A DecoderFamily whose layers may be mixtures of experts."""

    def parse_config(
        self, options: Mapping[str, Any], *, name: str | None, trust_remote_code: bool, where: str
    ) -> tuple[Any, list[str]]:
        config, problems = super().parse_config(
            options, name=name, trust_remote_code=trust_remote_code, where=where
        )
        found = moe_problems(config, where) if config is not None else []
        if found:
            return None, found
        return config, problems

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
