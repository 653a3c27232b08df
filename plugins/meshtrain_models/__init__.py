"""meshtrain_models: the built-in model families, each over its transformers model class.

    [model]
    family = "llama"                     # or "qwen3"
    name = "HuggingFaceTB/SmolLM-1.7B"   # or a local folder with config.json, or nothing
    num_hidden_layers = 5                # any key of the family's transformers config

Found by the core through the entry point `meshtrain_models = "meshtrain_models"`.
"""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from meshtrain.api import hookimpl
from meshtrain_models.family import DecoderFamily, Spec

__version__ = "0.1.0"

FAMILIES = {
    "llama": Spec(LlamaConfig, LlamaForCausalLM, model_types=("llama",)),
    "qwen3": Spec(Qwen3Config, Qwen3ForCausalLM, model_types=("qwen3",), head_norms=True),
}


@hookimpl
def model_families() -> dict[str, DecoderFamily]:
    return {name: DecoderFamily(spec) for name, spec in FAMILIES.items()}
