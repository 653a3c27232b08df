"""`declared_config`: a family's `[model]` table read against schema.json, without transformers.

transformers' config classes import torch and torch.distributed.tensor (seconds), so `meshtrain
check` reads the table itself where it can be sure transformers would agree: every key one of
PLAIN, each value of its field's exact type (transformers' @strict takes no int for a float, no
bool for an int), counts >= 1, a string only at its default, and -- of the result -- token ids
inside the vocabulary, hidden_size divisible by the heads and an even head_dim (what the config
class or the model itself would refuse). Anything else (a model.name, lists, rope scaling,
another transformers version) gives None, and the family's parse_config answers with
transformers. The problem lines are parse_config's own: the same checks (options.py) on the same
defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meshtrain_models.options import (
    head_dim_problem,
    known_keys,
    option_problems,
    rename_neox_keys,
)
from meshtrain_models.schema import load_schema
from meshtrain_models.shapes import moe_problems

PLAIN = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "original_max_position_embeddings",
        "sliding_window",
        "use_sliding_window",
        "max_window_layers",
        "tie_word_embeddings",
        "attention_bias",
        "mlp_bias",
        "rms_norm_eps",
        "layer_norm_eps",
        "use_parallel_residual",
        "use_cache",
        "hidden_act",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "num_experts",
        "num_local_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "decoder_sparse_step",
        "norm_topk_prob",
        "output_router_logits",
        "router_aux_loss_coef",
        "router_jitter_noise",
    }
)
"""Keys whose every effect on the config declared_config knows."""
ROPE = {"rope_theta": (0.0, None), "rotary_emb_base": (0.0, None), "rotary_pct": (0.0, 1.0)}
"""Keys transformers folds into rope_parameters (not kept as attributes): the open lower and
closed upper bound a number must be within."""
DERIVED = ("rope_parameters", "layer_types", "id2label", "label2id")
"""Fields transformers computes from several keys (rope, attention layer types, a classifier's
labels): not in a declared config."""


class DeclaredConfig:
    """A model config as plain attributes: the config class's fields with their defaults and the
    table's values (as transformers' __post_init__ leaves them), less DERIVED; reading an alias
    (attribute_map, e.g. num_experts) reads its field."""

    def __init__(self, values: Mapping[str, Any], aliases: Mapping[str, str]):
        self.__dict__.update(values)
        self._aliases = dict(aliases)

    def __getattr__(self, name: str) -> Any:  # only for what is not a field
        aliases = self.__dict__.get("_aliases", {})
        if name in aliases:
            return getattr(self, aliases[name])
        raise AttributeError(name)

    def values(self) -> dict[str, Any]:
        """The attributes, aliases left out."""
        return {k: v for k, v in vars(self).items() if k != "_aliases"}


def declare_config(
    class_name: str,
    layout: str,
    options: Mapping[str, Any],
    *,
    name: str | None,
    where: str,
    extra_keys: tuple[str, ...] = (),
) -> tuple[DeclaredConfig | None, list[str]] | None:
    """What parse_config would return for the family over `class_name`, or None (not sure)."""
    schema = load_schema()
    if schema is None or name:
        return None
    entry = schema["configs"][class_name]
    options = rename_neox_keys(options) if layout == "neox" else options
    keys = known_keys(entry["defaults"], entry["aliases"], extra_keys)
    problems = option_problems(options, entry["defaults"], keys, where)
    problem = head_dim_problem(options, entry["class_head_dim"], where) if not problems else ""
    if problems or problem:
        return None, problems or [problem]
    values = _values(entry, options)
    if values is None or not _sure(values):
        return None
    config = DeclaredConfig(values, entry["aliases"])
    problems = moe_problems(config, where) if layout == "moe" else []
    return (None, problems) if problems else (config, [])


def _values(entry: dict[str, Any], options: Mapping[str, Any]) -> dict[str, Any] | None:
    """The config's attributes, or None where an option is not plain."""
    fields, aliases = entry["fields"], entry["aliases"]
    values = {
        key: field["default"]
        for key, field in fields.items()
        if key not in DERIVED and key not in aliases  # an alias reads its field
    }
    for key, value in options.items():
        key = aliases.get(key, key)
        if key in ROPE:
            low, high = ROPE[key]
            if not (_number(value) and value > low and (high is None or value <= high)):
                return None
        elif key in PLAIN and key in fields and _exact(key, value, fields[key]):
            values[key] = value
        elif key in PLAIN and key not in fields and type(value) is int and value >= 1:
            values[key] = value  # an extra key the config keeps as it is (Qwen3-MoE's head_dim)
        else:
            return None
    return _post_init(values, entry)


def _exact(key: str, value: Any, field: dict[str, Any]) -> bool:
    """`value` is one of the field's plain types exactly, and a value transformers takes."""
    kind = {bool: "bool", int: "int", float: "float", str: "str"}.get(type(value))
    if kind is None or kind not in field["types"] or field["validated"]:
        return False
    if kind == "int":
        return value >= (0 if key.endswith("_token_id") else 1)
    return kind != "str" or value == field["default"]


def _number(value: Any) -> bool:
    return type(value) in (int, float)


def _post_init(values: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """What the families' __post_init__ derive from plain keys, where the class does: its
    default instance (`defaults`) holds another value than the field's own default."""
    fields, defaults = entry["fields"], entry["defaults"]

    def derives(key: str) -> bool:
        return key in fields and fields[key]["default"] != defaults.get(key)

    heads = values["num_attention_heads"]
    if derives("head_dim") and values["head_dim"] is None:
        values["head_dim"] = values["hidden_size"] // heads
    if derives("num_key_value_heads") and values["num_key_value_heads"] is None:
        values["num_key_value_heads"] = heads
    if derives("sliding_window") and not values.get("use_sliding_window", True):
        values["sliding_window"] = None
    if derives("mlp_only_layers") and values["mlp_only_layers"] is None:
        values["mlp_only_layers"] = []
    return values


def _sure(values: dict[str, Any]) -> bool:
    """Nothing transformers' validators or the model's constructor would refuse."""
    hidden, heads = values["hidden_size"], values["num_attention_heads"]
    kv = values.get("num_key_value_heads", heads)
    head_dim = values.get("head_dim") or hidden // heads
    vocab = values["vocab_size"]
    tokens_fit = all(
        value is None or (type(value) is int and 0 <= value < vocab)
        for key, value in values.items()
        if key.endswith("_token_id")
    )
    return hidden % heads == 0 and head_dim % 2 == 0 and type(kv) is int and kv >= 1 and tokens_fit
