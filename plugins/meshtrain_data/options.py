"""The `[data]` keys of each source (everything in `[data]` except `source`).

    [data]
    source = "hf"
    dataset = "data/*.jsonl"
    text_column = "body"
    tokenizer = "HuggingFaceTB/SmolLM2-135M"

The core validates these through `parse_section(cls, table, "...: data")` (types, choices, `min`);
`as_options` adds the bounds parse_section does not know (`below`) when a source uses them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from meshtrain.api import ConfigError, parse_section

T = TypeVar("T")


def _opt(
    default: Any, *, choices: tuple = (), min: float | None = None, below: float | None = None
) -> Any:
    return field(default=default, metadata={"choices": choices, "min": min, "below": below})


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
    eval_share: float = _opt(0.02, min=0, below=1)
    """Share of the split's documents set aside for [eval] (every 1/share-th), unless
    eval_dataset or eval_split name held-out data of their own."""
    eval_dataset: str = ""
    """Held-out data for [eval] (like `dataset`); default `dataset` when eval_split is set."""
    eval_split: str = ""
    """Split of eval_dataset (or of `dataset`) for [eval], e.g. "validation"."""


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
    eval_share: float = _opt(0.02, min=0, below=1)
    """Share of the corpus documents set aside for [eval] (every 1/share-th); never trained on."""


@dataclass(frozen=True, kw_only=True)
class SyntheticOptions:
    """Uniform random tokens from train.seed over model.vocab_size."""

    masked_share: float = _opt(0.0, min=0, below=1)
    """Share of labels set to IGNORE_INDEX, drawn per row from the same per-row generator so every
    layout masks the same labels; for tests and benchmarks of masked losses."""


def as_options(cls: type[T], options: Any) -> T:
    """`options` as a checked `cls`: tables (tests and direct calls) go through parse_section, and
    instances (the core's, already parsed) still get the `below` bounds it does not check."""
    if options is None:
        options = cls()
    elif isinstance(options, Mapping):
        options, problems = parse_section(cls, dict(options), "data")
        if problems:
            raise ConfigError(problems)
    elif not isinstance(options, cls):
        raise TypeError(f"meshtrain_data: expected {cls.__name__} or a table, got {options!r}")
    problems = []
    for item in fields(options):
        below, value = item.metadata.get("below"), getattr(options, item.name)
        if below is not None and not value < below:
            problems.append(f"data.{item.name}: {value!r} is out of range (must be < {below:g})")
    if problems:
        raise ConfigError(problems)
    return options
