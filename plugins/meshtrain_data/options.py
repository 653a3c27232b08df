"""The `[data]` keys of each source (everything in `[data]` except `source`).

    [data]
    source = "hf"
    dataset = "data/*.jsonl"
    text_column = "body"
    tokenizer = "HuggingFaceTB/SmolLM2-135M"

The core validates these through `meshtrain.config.parse_section(cls, table, "...: data")`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from meshtrain.config import parse_section
from meshtrain.errors import ConfigError

T = TypeVar("T")


def _opt(default: Any, *, choices: tuple = (), min: float | None = None) -> Any:
    return field(default=default, metadata={"choices": choices, "min": min})


@dataclass(frozen=True, kw_only=True)
class HFOptions:
    dataset: str = ""
    """Hub dataset id, or a local .txt/.json/.jsonl/.parquet file, a folder of them or a glob."""
    name: str = ""
    """Configuration name of a hub dataset (e.g. "wikitext-2-raw-v1")."""
    split: str = "train"
    """Split to read; slices such as "train[:10%]" work too. Local files form the "train" split."""
    text_column: str = "text"
    """Column holding each document's text (.txt files: one document per paragraph, "text")."""
    tokenizer: str = ""
    """Hub id or local folder of a Hugging Face tokenizer (required)."""
    streaming: bool = False
    """Read and tokenize while training instead of packing everything in `prepare`."""
    shuffle: bool = True
    """Shuffle the packed windows every epoch from train.seed (not when streaming)."""


@dataclass(frozen=True, kw_only=True)
class OfflineOptions:
    vocab_size: int = _opt(8192, min=259)
    """BPE vocabulary size; the tokenizer gets min(this, model.vocab_size) tokens."""
    corpus_mb: float = _opt(4.0, min=0.1)
    """Corpus size cap in MB: language reference + stdlib docstrings, then stdlib sources."""
    sources: bool = True
    """Fill the corpus up to corpus_mb with standard-library source code."""
    shuffle: bool = True
    """Shuffle the packed windows every epoch from train.seed."""


@dataclass(frozen=True, kw_only=True)
class SyntheticOptions:
    """No keys: uniform random tokens from train.seed over model.vocab_size."""


def as_options(cls: type[T], options: Any) -> T:
    """`options` as `cls`: instances pass through, tables are checked (tests and direct calls)."""
    if isinstance(options, cls):
        return options
    if options is None:
        return cls()
    if not isinstance(options, Mapping):
        raise TypeError(f"meshtrain_data: expected {cls.__name__} or a table, got {options!r}")
    parsed, problems = parse_section(cls, dict(options), "data")
    if problems:
        raise ConfigError(problems)
    return parsed
