"""The LLaMA model family (SmolLM and every checkpoint with the same layout), via transformers.

[model]
family = "llama"
name = "HuggingFaceTB/SmolLM-1.7B"   # or a local folder with config.json, or nothing
num_hidden_layers = 5                # any LlamaConfig field overrides what `name` gives
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from meshtrain import hookimpl
from meshtrain.contracts import ModelShape
from meshtrain.errors import suggest
from meshtrain.hub import hub_problem
from meshtrain_llama.plan import build_tp_plan
from meshtrain_llama.stage import LlamaStage

_DEFAULTS = LlamaConfig().to_dict()
_KEYS = sorted(
    set(_DEFAULTS)
    - {
        "_name_or_path",
        "transformers_version",
        "architectures",
        "model_type",
        "id2label",
        "label2id",
    }
    | {"rope_theta"}
)


class LlamaFamily:
    """`ModelFamily` for `LlamaForCausalLM` (see meshtrain.contracts)."""

    def parse_config(
        self, options: Mapping[str, Any], *, name: str | None, trust_remote_code: bool, where: str
    ) -> tuple[Any, list[str]]:
        section = where.rsplit(": ", 1)[-1]
        problems = [
            f"{where}.{key}: unknown key" + suggest(key, _KEYS).replace("mean ", f"mean {section}.")
            for key in options
            if key not in _KEYS
        ]
        problems += [
            _type_problem(where, key, value)
            for key, value in options.items()
            if key in _KEYS and _type_problem(where, key, value)
        ]
        base: dict[str, Any] = {}
        if name:
            base, problem = _read_named_config(name, where, trust_remote_code)
            problems += [problem] if problem else []
        if problems:
            return None, problems
        config = LlamaConfig(**{**base, **options})
        config._attn_implementation = "sdpa"  # causal without a mask; eager would not be
        return config, []

    def shape(self, model_config: LlamaConfig) -> ModelShape:
        c = model_config
        return ModelShape(
            num_layers=c.num_hidden_layers,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_heads=c.num_attention_heads,
            num_kv_heads=c.num_key_value_heads,
            vocab_size=c.vocab_size,
            max_positions=c.max_position_embeddings,
            tied_embeddings=bool(c.tie_word_embeddings),
        )

    def build(self, model_config: LlamaConfig) -> nn.Module:
        return LlamaForCausalLM(model_config)

    def split(self, model: nn.Module, layers: range, *, first: bool, last: bool) -> nn.Module:
        return LlamaStage(model, layers, first=first, last=last)

    def tp_plan(self, stage: nn.Module, *, sequence_parallel: bool) -> dict[str, Any]:
        return build_tp_plan(stage, sequence_parallel=sequence_parallel)

    def init_parameter(
        self, name: str, shape: torch.Size, model_config: LlamaConfig, generator: torch.Generator
    ) -> torch.Tensor:
        # Hugging Face's Llama init: N(0, initializer_range) for linears and the embedding,
        # ones for the RMSNorm weights, a zero padding row.
        if name.endswith("norm.weight"):
            return torch.ones(shape)
        if name.endswith(".bias"):
            return torch.zeros(shape)
        value = torch.empty(shape).normal_(0.0, model_config.initializer_range, generator=generator)
        if name == "model.embed_tokens.weight" and model_config.pad_token_id is not None:
            value[model_config.pad_token_id] = 0
        return value

    def init_buffers(self, stage: nn.Module) -> None:
        # After to_empty() the rotary inv_freq buffer holds garbage: recompute it.
        rotary = stage.model.rotary_emb
        init = (
            rotary.compute_default_rope_parameters
            if rotary.rope_type == "default"
            else ROPE_INIT_FUNCTIONS[rotary.rope_type]
        )
        inv_freq, rotary.attention_scaling = init(stage.config)
        rotary.inv_freq = inv_freq.to(rotary.inv_freq.device)
        rotary.original_inv_freq = rotary.inv_freq.clone()

    def tied_parameters(self, model_config: LlamaConfig) -> list[tuple[str, str]]:
        if model_config.tie_word_embeddings:
            return [("model.embed_tokens.weight", "lm_head.weight")]
        return []

    def flops_per_token(self, model_config: LlamaConfig, seq_len: int) -> float:
        c = model_config
        head_dim = c.hidden_size // c.num_attention_heads
        attn = c.hidden_size * head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
        mlp = 3 * c.hidden_size * c.intermediate_size
        matmul_params = c.num_hidden_layers * (attn + mlp) + c.hidden_size * c.vocab_size
        # 6 FLOPs per parameter per token (fwd + bwd) plus attention scores (PaLM appendix B).
        return 6.0 * matmul_params + 12.0 * c.num_hidden_layers * c.hidden_size * seq_len


def _type_problem(where: str, key: str, value: Any) -> str:
    default = _DEFAULTS.get(key)
    if isinstance(default, bool) and not isinstance(value, bool):
        return f"{where}.{key}: expected a boolean, got {value!r}"
    if (
        isinstance(default, int)
        and not isinstance(default, bool)
        and (isinstance(value, bool) or not isinstance(value, int))
    ):
        return f"{where}.{key}: expected an integer, got {value!r}"
    if isinstance(default, float) and (
        isinstance(value, bool) or not isinstance(value, int | float)
    ):
        return f"{where}.{key}: expected a number, got {value!r}"
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        return f"{where}.{key}: {value!r} is out of range (must be >= 0)"
    return ""


def _read_named_config(name: str, where: str, trust_remote_code: bool) -> tuple[dict, str]:
    folder = Path(name).expanduser()
    if folder.is_dir() and not (folder / "config.json").is_file():
        return {}, f"{where}.name: folder {name} has no config.json"
    problem = hub_problem(
        name,
        f"{where}.name",
        "download it where the hub is reachable and set "
        "model.name to its folder, or write the architecture inline "
        "(hidden_size = ..., as configs/smollm_cpu.toml does)",
    )
    if problem:
        return {}, problem
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        str(folder) if folder.is_dir() else name, trust_remote_code=trust_remote_code
    )
    if config.model_type not in ("llama",):
        return {}, f"{where}.name: {name} is a {config.model_type!r} model, not llama"
    values = config.to_dict()
    return {k: v for k, v in values.items() if k in _KEYS or k == "rope_parameters"}, ""


@hookimpl
def model_families() -> dict[str, LlamaFamily]:
    return {"llama": LlamaFamily()}
