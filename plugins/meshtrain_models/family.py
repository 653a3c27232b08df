"""A model family over a Hugging Face decoder class with the LLaMA layout (Llama, Qwen3, Mistral,
Qwen2, Gemma, Phi-3); GPT-NeoX (neox.py) builds on it.

One `DecoderFamily` per architecture, configured by a `Spec`: the transformers config and model
classes, the `model_type`s it accepts and what its blocks hold beyond LLaMA's. It is the part of a
family that needs torch and transformers; the catalog entry (`LazyFamily`, __init__.py) answers
`shape`, `tied_parameters` and what `meshtrain check` asks without them (shapes.py,
parameters.py, declared.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meshtrain.api import StagePlan
from meshtrain_models.options import parse_model_config
from meshtrain_models.plan import build_plan
from meshtrain_models.stage import DecoderStage


@dataclass(frozen=True)
class Spec:
    config_class: type
    model_class: type
    model_types: tuple[str, ...]
    qk_norms: str = ""
    """RMSNorms on q and k: "head" (over each head: Qwen3), "projection" (over all heads of the
    projection: OLMo2) or "" (none)."""
    norm_weight: float = 1.0
    """Initial RMSNorm weight: 1, or 0 where the norm multiplies by (1 + weight) (Gemma)."""
    extra_keys: tuple[str, ...] = ()
    """`[model]` / config.json keys the config class takes but does not keep (legacy names)."""
    hf_experts: tuple[str, str, str, str] = ("mlp", "gate_proj", "up_proj", "down_proj")
    """Mixtures of experts (moe.py): the block's name in Hugging Face checkpoints and its
    experts' gate, up and down projections."""
    qkv_bias: bool = False
    """q/k/v projections always have biases, whatever config.attention_bias says (Qwen2)."""
    post_norms: bool = False
    """Norms after attention and MLP (post_attention_layernorm, post_feedforward_layernorm)
    instead of before them (OLMo2)."""
    fused: bool = False
    """One Linear for [Q | K | V] and one for [gate | up] (Phi-3)."""


class DecoderFamily:
    """`ModelFamily` (see meshtrain.contracts) for one transformers decoder class, less what
    `LazyFamily` answers without torch."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.model_types = spec.model_types

    def parse_config(
        self, options: Mapping[str, Any], *, name: str | None, trust_remote_code: bool, where: str
    ) -> tuple[Any, list[str]]:
        return parse_model_config(
            self.spec.config_class,
            self.model_types,
            options,
            name=name,
            trust_remote_code=trust_remote_code,
            where=where,
            extra_keys=self.spec.extra_keys,
        )

    def build(self, model_config: Any) -> nn.Module:
        return self.spec.model_class(model_config)

    def split(
        self, model: nn.Module, layers: range, *, first: bool, last: bool, sequence_shards: int
    ) -> nn.Module:
        return DecoderStage(model, layers, first=first, last=last, sequence_shards=sequence_shards)

    def plan(self, stage: nn.Module, *, sequence_parallel: bool) -> StagePlan:
        return build_plan(stage, sequence_parallel=sequence_parallel, qk_norms=self.spec.qk_norms)

    def init_parameter(
        self, name: str, shape: torch.Size, model_config: Any, generator: torch.Generator
    ) -> torch.Tensor:
        # Hugging Face's init for these models (PreTrainedModel._init_weights): N(0,
        # initializer_range) for linears and the embedding, zero biases and padding row, RMSNorm
        # weights ones (zeros for Gemma's (1 + weight) norms).
        if name.endswith("norm.weight"):
            return torch.full(shape, self.spec.norm_weight)
        if name.endswith(".bias"):
            return torch.zeros(shape)
        value = torch.empty(shape).normal_(0.0, model_config.initializer_range, generator=generator)
        if name == "model.embed_tokens.weight" and model_config.pad_token_id is not None:
            value[model_config.pad_token_id] = 0
        return value

    def init_buffers(self, stage: nn.Module) -> None:
        # After to_empty() the rotary inv_freq buffer (and Gemma's embedding scale) hold garbage:
        # recompute them.
        embedding = getattr(stage.model, "embed_tokens", None)
        if hasattr(embedding, "embed_scale"):  # sqrt(hidden_size), a float32 scalar
            embedding.embed_scale = torch.tensor(
                embedding.scalar_embed_scale, device=embedding.embed_scale.device
            )

        reset_rotary(stage.model.rotary_emb, stage.config)

    def export(self, model: nn.Module, folder: Path, max_shard_size: str) -> None:
        model.save_pretrained(str(folder), max_shard_size=max_shard_size)


def reset_rotary(rotary: nn.Module, config: Any) -> None:
    """Recompute a transformers rotary embedding's inv_freq buffers for `config`."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    init = (
        rotary.compute_default_rope_parameters
        if rotary.rope_type == "default"
        else ROPE_INIT_FUNCTIONS[rotary.rope_type]
    )
    inv_freq, rotary.attention_scaling = init(config)
    rotary.inv_freq = inv_freq.to(rotary.inv_freq.device)
    rotary.original_inv_freq = rotary.inv_freq.clone()
