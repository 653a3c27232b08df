"""meshtrain_models: the built-in model families, each over its transformers model class.

    [model]
    family = "llama"                     # qwen3, mistral, qwen2, gemma, phi3; "auto": model.name's
    name = "HuggingFaceTB/SmolLM-1.7B"   # or a local folder with config.json, or nothing
    num_hidden_layers = 5                # any key of the family's transformers config

Found by the core through the entry point `meshtrain_models = "meshtrain_models"`.
"""

from __future__ import annotations

from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from meshtrain.api import hookimpl
from meshtrain_models.family import DecoderFamily, Spec

__version__ = "0.1.0"

FAMILIES = {
    "llama": Spec(LlamaConfig, LlamaForCausalLM, model_types=("llama",)),
    "qwen3": Spec(Qwen3Config, Qwen3ForCausalLM, model_types=("qwen3",), head_norms=True),
    # Sliding-window attention where the window is shorter than train.seq_len (stage.py).
    "mistral": Spec(MistralConfig, MistralForCausalLM, model_types=("mistral",)),
    # q/k/v biases (split with their weights); optional sliding-window layers.
    "qwen2": Spec(Qwen2Config, Qwen2ForCausalLM, model_types=("qwen2",)),
    # Embedding scaled by sqrt(hidden_size), (1 + weight) norms, often one key/value head.
    "gemma": Spec(GemmaConfig, GemmaForCausalLM, model_types=("gemma",), norm_weight=0.0),
    # Fused qkv_proj [Q | K | V] and gate_up_proj [gate | up]; a sliding window.
    "phi3": Spec(Phi3Config, Phi3ForCausalLM, model_types=("phi3",)),
}


@hookimpl
def model_families() -> dict[str, DecoderFamily]:
    return {name: DecoderFamily(spec) for name, spec in FAMILIES.items()}
