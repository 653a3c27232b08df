"""`[model]` keys -> a transformers config: every key checked, every problem named at once."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from meshtrain.api import first_line, hub_problem, suggest

SKIPPED = {
    "_name_or_path",
    "transformers_version",
    "architectures",
    "model_type",
    "id2label",
    "label2id",
}
HINT = (
    "download it where the hub is reachable and set model.name to its folder, or write the "
    "architecture inline (hidden_size = ..., as configs/smollm_cpu.toml does)"
)


def parse_model_config(
    config_class: type,
    model_types: tuple[str, ...],
    options: Mapping[str, Any],
    *,
    name: str | None,
    trust_remote_code: bool,
    where: str,
    extra_keys: tuple[str, ...] = (),
) -> tuple[Any, list[str]]:
    """The config from `name`'s config.json (if any) with `options` on top; or the problems.
    `extra_keys`: keys the config class takes without keeping them (legacy names)."""
    defaults = config_class().to_dict()
    aliases = getattr(config_class, "attribute_map", {})  # e.g. num_experts -> num_local_experts
    keys = known_keys(defaults, aliases, extra_keys)
    problems = option_problems(options, defaults, keys, where)
    base: dict[str, Any] = {}
    if name:
        base, problem = _read_named_config(name, where, model_types, keys)
        problems += [problem] if problem else []
    if problems:
        return None, problems
    if "num_hidden_layers" in options:
        base.pop("layer_types", None)  # sized for the original depth; derived again
    merged = {**base, **options}
    problem = head_dim_problem(merged, getattr(config_class, "head_dim", None), where)
    if problem:
        return None, [problem]
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its warnings about values model_problems names itself
    try:
        config = config_class(**merged)
    except Exception as err:  # transformers' validators raise their own classes, with a cause
        while err.__cause__ is not None:
            err = err.__cause__
        text = first_line(err)
        return None, [f"{where}: {config_class.__name__} rejects these keys: {text}"]
    finally:
        hf_logging.set_verbosity(verbosity)
    problems = model_problems(config, where)
    if problems:
        return None, problems
    config._attn_implementation = "sdpa"  # causal without a mask; eager would not be
    return config, []


def model_problems(config: Any, where: str) -> list[str]:
    """What the config class takes but the model's constructor would refuse: a padding id
    outside the vocabulary (nn.Embedding's padding_idx), an activation transformers lacks."""
    from transformers.activations import ACT2FN

    section = where.rsplit(": ", 1)[-1]
    problems = []
    pad, vocab = getattr(config, "pad_token_id", None), config.vocab_size
    if isinstance(pad, int) and not 0 <= pad < vocab:
        problems.append(
            f"{where}.pad_token_id: {pad} is outside the vocabulary "
            f"({section}.vocab_size = {vocab})"
        )
    for key in ("hidden_act", "hidden_activation"):
        value = getattr(config, key, None)
        if isinstance(value, str) and value not in ACT2FN:
            problems.append(
                f"{where}.{key}: unknown activation {value!r}" + suggest(value, sorted(ACT2FN))
            )
    return problems


def known_keys(
    defaults: Mapping[str, Any], aliases: Mapping[str, str], extra_keys: tuple[str, ...]
) -> list[str]:
    """The `[model]` keys a config class takes: its fields (`defaults`, its `to_dict()`), their
    aliases and `extra_keys`."""
    return sorted(set(defaults) - SKIPPED | {"rope_theta", *extra_keys, *aliases})


def option_problems(
    options: Mapping[str, Any], defaults: Mapping[str, Any], keys: list[str], where: str
) -> list[str]:
    """Unknown keys (with the nearest known one) and values of the wrong type, a line each."""
    section = where.rsplit(": ", 1)[-1]
    problems = [
        f"{where}.{key}: unknown key" + suggest(key, keys).replace("mean ", f"mean {section}.")
        for key in options
        if key not in keys
    ]
    return problems + [
        line
        for key, value in options.items()
        if key in defaults
        for line in [_type_problem(where, key, value, defaults[key])]
        if line
    ]


def head_dim_problem(merged: Mapping[str, Any], class_head_dim: Any, where: str) -> str:
    """head_dim = hidden / heads unless given, or the class has a default of its own (Gemma's
    256): then hidden_size must be divisible by the heads."""
    heads, hidden = merged.get("num_attention_heads"), merged.get("hidden_size")
    derived = "head_dim" not in merged and class_head_dim is None
    if derived and heads and hidden and hidden % heads:
        section = where.rsplit(": ", 1)[-1]
        return (
            f"{where}.hidden_size: {hidden} is not divisible by "
            f"{section}.num_attention_heads ({heads})"
        )
    return ""


def rename_neox_keys(options: Mapping[str, Any]) -> dict[str, Any]:
    """transformers' GPTNeoXConfig ignores rope_theta and reads Pythia's rotary_emb_base."""
    return {("rotary_emb_base" if k == "rope_theta" else k): v for k, v in options.items()}


def _type_problem(where: str, key: str, value: Any, default: Any) -> str:
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


def _read_named_config(
    name: str, where: str, model_types: tuple[str, ...], keys: list[str]
) -> tuple[dict, str]:
    folder = Path(name).expanduser()
    if folder.is_dir():
        path = folder / "config.json"
        if not path.is_file():
            return {}, f"{where}.name: folder {name} has no config.json"
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            return {}, f"{where}.name: {path} is not valid JSON ({str(err).splitlines()[0]})"
    else:
        problem = hub_problem(name, f"{where}.name", HINT)
        if problem:
            return {}, problem
        from transformers import AutoConfig

        values = AutoConfig.from_pretrained(name).to_dict()
    if not isinstance(values, dict):
        return {}, f"{where}.name: {name}: config.json does not hold a JSON object"
    kind = values.get("model_type")
    if kind not in model_types:
        return {}, (
            f"{where}.name: {name} is a {kind!r} model; this family trains {', '.join(model_types)}"
        )
    return {k: v for k, v in values.items() if k in keys or k == "rope_parameters"}, ""
