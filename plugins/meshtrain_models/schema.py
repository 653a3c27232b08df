"""The built-in families' transformers config classes as data (schema.json): their fields, types
and defaults, so that `meshtrain check` reads a `[model]` table without importing transformers,
whose config classes import torch and torch.distributed.tensor (seconds; see declared.py).

    python -m meshtrain_models.schema     # rewrite schema.json from the installed transformers

schema.json names the transformers version it was taken from. With another one installed (a
new release), the first `load_schema` on a machine describes that one (importing transformers,
once) and keeps it in the cache folder ($MESHTRAIN_CACHE/schema/), so later checks are fast again.
tests/test_declared.py checks that the schema used is what the installed transformers says.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import typing
from pathlib import Path
from typing import Any

from meshtrain.api import cache_dir, write_cache

SCHEMA = Path(__file__).with_name("schema.json")
SIMPLE = {int: "int", float: "float", bool: "bool", str: "str", type(None): "None"}


@functools.cache
def load_schema() -> dict[str, Any] | None:
    """What the installed transformers' config classes are: schema.json where it describes that
    version, else this machine's cached description (made on first use). None without
    transformers, or where describing it failed (the families then parse with transformers)."""
    try:
        installed = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None
    schema = json.loads(SCHEMA.read_text())
    if schema["transformers"] == installed:
        return schema
    cached = cache_dir() / "schema" / f"transformers-{installed}.json"
    try:
        schema = json.loads(cached.read_text())
        if schema.get("transformers") == installed:
            return schema
    except (OSError, ValueError):
        pass
    try:
        schema = json.loads(json.dumps(build_schema()))
    except (AttributeError, TypeError, ValueError):  # a release that renamed what describe reads
        return None
    try:
        write_cache(cached, schema)
    except OSError:
        pass  # a read-only cache: the next check describes it again
    return schema


def build_schema() -> dict[str, Any]:
    """What the installed transformers says about each built-in family's config class."""
    import transformers

    from meshtrain_models import FAMILIES

    names = sorted({f"{entry['prefix']}Config" for entry in FAMILIES.values()})
    return {
        "transformers": importlib.metadata.version("transformers"),
        "configs": {name: describe(getattr(transformers, name)) for name in names},
    }


def describe(config_class: type) -> dict[str, Any]:
    """`defaults`: the default config's to_dict() (what parse_model_config checks keys and types
    against); `fields`: each dataclass field's own default (None where JSON cannot hold it), its
    types and whether a validator of its own checks it; `aliases`: attribute_map;
    `class_head_dim`: the class's head_dim default, if any."""
    fields = {}
    for item in dataclasses.fields(config_class):
        default = item.default
        if default is dataclasses.MISSING and item.default_factory is not dataclasses.MISSING:
            default = item.default_factory()
        fields[item.name] = {
            "default": default if _is_json(default) else None,
            "types": _type_names(item.type),
            "validated": bool(item.metadata),
        }
    return {
        "defaults": config_class().to_dict(),
        "fields": fields,
        "aliases": dict(getattr(config_class, "attribute_map", {})),
        "class_head_dim": getattr(config_class, "head_dim", None),
    }


def _type_names(annotation: Any) -> list[str]:
    """['int', 'other', 'None'] for `int | list[int] | None`: the members' names where they are
    int, float, bool, str or None, else "other". Base-class fields are annotated as strings."""
    if isinstance(annotation, str):
        names = [part.strip() for part in annotation.split("|")]
        return [name if name in SIMPLE.values() else "other" for name in names]
    members = typing.get_args(annotation) or (annotation,)
    return [SIMPLE.get(member, "other") for member in members]


def _is_json(value: Any) -> bool:
    try:
        return json.loads(json.dumps(value)) == value
    except (TypeError, ValueError):
        return False


if __name__ == "__main__":
    SCHEMA.write_text(json.dumps(build_schema(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {SCHEMA}")
