"""meshtrain_models: the built-in model families, each over its transformers model class.

    [model]
    family = "auto"                      # model.name's model_type; or llama, qwen3, mistral,
                                         # qwen2, gemma, olmo2, phi3, gpt_neox, qwen3_moe, mixtral
    name = "HuggingFaceTB/SmolLM-1.7B"   # or a local folder with config.json, or nothing
    num_hidden_layers = 5                # any key of the family's transformers config

Found by the core through the entry point `meshtrain_models = "meshtrain_models"`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meshtrain.api import ModelShape, ParamSpec, hookimpl
from meshtrain_models.declared import declare_config
from meshtrain_models.parameters import decoder_parameters, neox_parameters, tied_parameters
from meshtrain_models.shapes import decoder_shape, moe_shape, neox_shape

__version__ = "0.1.0"

FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"prefix": "Llama", "model_types": ("llama",)},
    "qwen3": {"prefix": "Qwen3", "model_types": ("qwen3",), "qk_norms": "head"},
    # Post-norm blocks; q/k RMSNorms over the whole projection, split over tp.
    "olmo2": {
        "prefix": "Olmo2",
        "model_types": ("olmo2",),
        "qk_norms": "projection",
        "post_norms": True,
    },
    # Sliding-window attention where the window is shorter than train.seq_len (stage.py).
    "mistral": {"prefix": "Mistral", "model_types": ("mistral",)},
    # q/k/v biases (split with their weights); optional sliding-window layers.
    "qwen2": {"prefix": "Qwen2", "model_types": ("qwen2",), "qkv_bias": True},
    # Embedding scaled by sqrt(hidden_size), (1 + weight) norms, often one key/value head.
    "gemma": {"prefix": "Gemma", "model_types": ("gemma",), "norm_weight": 0.0},
    # Fused qkv_proj [Q | K | V] and gate_up_proj [gate | up]; a sliding window.
    "phi3": {"prefix": "Phi3", "model_types": ("phi3",), "fused": True},
    # Not LLaMA-shaped (neox.py): per-head fused qkv, LayerNorms with biases, parallel residual,
    # partial rotary; Pythia's config.json names rotary_pct / rotary_emb_base.
    "gpt_neox": {
        "prefix": "GPTNeoX",
        "model_types": ("gpt_neox",),
        "layout": "neox",
        "extra_keys": ("rotary_pct", "rotary_emb_base"),
    },
    # Mixtures of experts (moe.py): Qwen3 attention; some layers may stay dense.
    "qwen3_moe": {
        "prefix": "Qwen3Moe",
        "model_types": ("qwen3_moe",),
        "qk_norms": "head",
        "layout": "moe",
        "extra_keys": ("head_dim",),  # read by the attention, not a default of the config
    },
    # Every layer a mixture; checkpoints name it block_sparse_moe with w1 / w3 / w2 experts.
    "mixtral": {
        "prefix": "Mixtral",
        "model_types": ("mixtral",),
        "layout": "moe",
        "hf_experts": ("block_sparse_moe", "w1", "w3", "w2"),
    },
}
"""Each family: the transformers classes <prefix>Config and <prefix>ForCausalLM, its layout
("llama": family.py, "neox": neox.py, "moe": moe.py) and the rest of its Spec."""


LAYOUT_MODULES = {
    "llama": "meshtrain_models.family",
    "neox": "meshtrain_models.neox",
    "moe": "meshtrain_models.moe",
}
"""Where each layout's family class lives."""


class LazyFamily:
    """A catalog entry that costs nothing to list (`meshtrain plugins`) and answers `meshtrain
    check` without torch or transformers: `declared_config`, `shape`, `stage_parameters` and
    `tied_parameters` are its own (declared.py, shapes.py, parameters.py); the rest loads torch,
    transformers and the `DecoderFamily` on first use."""

    def __init__(
        self, prefix: str, model_types: tuple[str, ...], layout: str = "llama", **spec: Any
    ):
        self.model_types = model_types
        # What a worker imports to build the model: the local launcher imports it once before
        # forking workers (transformers' model module alone takes seconds).
        module = model_types[0]
        self.worker_imports = (
            f"transformers.models.{module}.modeling_{module}",
            LAYOUT_MODULES[layout],
        )
        self._prefix, self._layout, self._spec, self._family = prefix, layout, spec, None

    def declared_config(
        self, options: Mapping[str, Any], *, name: str | None, trust_remote_code: bool, where: str
    ) -> tuple[Any, list[str]] | None:
        return declare_config(
            f"{self._prefix}Config",
            self._layout,
            options,
            name=name,
            where=where,
            extra_keys=self._spec.get("extra_keys", ()),
        )

    def shape(self, model_config: Any) -> ModelShape:
        shape = {"llama": decoder_shape, "neox": neox_shape, "moe": moe_shape}[self._layout]
        return shape(model_config, self._spec.get("qk_norms", ""))

    def stage_parameters(
        self,
        model_config: Any,
        layers: range,
        *,
        first: bool,
        last: bool,
        tp: int,
        sequence_parallel: bool,
    ) -> list[ParamSpec]:
        declare = neox_parameters if self._layout == "neox" else decoder_parameters
        spec = {**self._spec, "layout": self._layout}
        return declare(model_config, layers, first=first, last=last, tp=tp, spec=spec)

    def tied_parameters(self, model_config: Any) -> list[tuple[str, str]]:
        return tied_parameters(self._layout, model_config)

    def __getattr__(self, attr: str) -> Any:  # only for what the entry itself lacks
        if attr.startswith("_"):
            raise AttributeError(attr)
        if self._family is None:
            import transformers

            from meshtrain_models.family import DecoderFamily, Spec
            from meshtrain_models.moe import MoeFamily
            from meshtrain_models.neox import NeoxFamily

            config_class = getattr(transformers, f"{self._prefix}Config")
            model_class = getattr(transformers, f"{self._prefix}ForCausalLM")
            spec = Spec(config_class, model_class, model_types=self.model_types, **self._spec)
            layouts = {"llama": DecoderFamily, "neox": NeoxFamily, "moe": MoeFamily}
            self._family = layouts[self._layout](spec)
        return getattr(self._family, attr)


@hookimpl
def model_families() -> dict[str, LazyFamily]:
    return {name: LazyFamily(**entry) for name, entry in FAMILIES.items()}
