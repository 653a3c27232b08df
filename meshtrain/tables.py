"""TOML files and tables: reading a file over its `base`, `--set` overrides, and filling a frozen
dataclass from a table with every problem reported as one line (meshtrain.config uses these for
the core sections; plugins use `parse_section` for their own).
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any, get_type_hints

from meshtrain.errors import ConfigError, suggest


def parse_section(
    cls: type, table: dict, where: str, *, open_keys: bool = False
) -> tuple[Any, list[str]]:
    """Fill dataclass `cls` from `table`; returns (instance or defaults, problem lines).

    `where` is "file: section"; problems read "file: section.key: ...". Plugins use this for
    their own sections. With `open_keys`, unknown keys go to the `options` field instead."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "options" or not open_keys}
    problems, values, options = [], {}, {}
    for key, value in table.items():
        if key not in fields:
            if open_keys:
                options[key] = value
            else:
                problems.append(f"{where}.{key}: unknown key{_suggest_key(key, fields, where)}")
            continue
        problem = _check_value(value, hints[key], fields[key].metadata)
        if problem:
            problems.append(f"{where}.{key}: {problem}")
        else:
            values[key] = float(value) if hints[key] is float else value
    if open_keys:
        values["options"] = options
    return (cls(**values) if not problems else cls()), problems


def _suggest_key(key: str, fields: dict, where: str) -> str:
    hint = suggest(key, fields)
    section = where.rsplit(": ", 1)[-1]
    return hint.replace("mean ", f"mean {section}.") if hint else ""


def _check_value(value: Any, kind: Any, meta: Any) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        list: lambda v: isinstance(v, list),
        dict: lambda v: isinstance(v, dict),
    }
    if kind in ok and not ok[kind](value):
        return f"expected {names[kind]}, got {value!r}"
    choices = meta.get("choices") or ()
    if choices and value not in choices:
        hint = suggest(str(value), choices)
        return f"{value!r} is not one of {', '.join(map(repr, choices))}{hint}"
    low = meta.get("min")
    if low is not None and value < low:
        return f"{value!r} is out of range (must be >= {low:g})"
    return ""


def read_with_bases(path: Path, chain: list[Path]) -> dict:
    """The tables of TOML file `path`, over those of its `base` file (and its base's, ...);
    `chain` is the files already read on the way here."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in [*chain, resolved])
        raise ConfigError(f"{path}: base: circular base chain ({cycle})")
    if not path.is_file():
        where = f"{chain[-1]}: base" if chain else "config"
        raise ConfigError(f"{where}: file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a file name, got {base!r}")
    parent = read_with_bases(path.parent / base, [*chain, resolved])
    return deep_merge(parent, raw)


def deep_merge(base: dict, top: dict) -> dict:
    """`top` over `base`, merging nested tables; neither input is changed."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_override(raw: dict, item: str, path: Path, problems: list[str]) -> None:
    """Set the dotted key of `--set` `item` (table.key=value, the value TOML or a bare word) in
    `raw`; a problem line where it cannot."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or "." not in key:
        problems.append(f"--set {item}: expected table.key=value (e.g. parallel.tp=2)")
        return
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()  # a bare word such as gpipe is meant as a string
    *tables, last = key.split(".")
    node = raw
    for table in tables:
        node = node.setdefault(table, {})
        if not isinstance(node, dict):
            problems.append(f"--set {item}: {table} is not a table in {path}")
            return
    node[last] = value
