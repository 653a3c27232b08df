"""meshtrain_data: the built-in data sources of meshtrain.

    [data]
    source = "offline"    # default: Python's own docs and sources, BPE trained on them, no network
    source = "hf"         # a Hugging Face dataset (hub id or local txt/json/jsonl/parquet files)
    source = "synthetic"  # random tokens for benchmarks

Found by the core through the entry point `meshtrain_data = "meshtrain_data"` (group "meshtrain").
Each source's `prepare` runs once per node before the workers `open` their streams.
"""

from __future__ import annotations

import importlib
from typing import Any

from meshtrain.api import hookimpl
from meshtrain_data.options import HFOptions, OfflineOptions, SyntheticOptions

__version__ = "0.1.0"


class LazySource:
    """A catalog entry that costs nothing to list: its keys (`config_class`) are known at once,
    the source itself (torch, tokenizers, datasets) loads on first use."""

    def __init__(self, config_class: type, path: str):
        self.config_class = config_class
        self._path, self._source = path, None

    def __getattr__(self, attr: str) -> Any:  # only for what the entry itself lacks
        if attr.startswith("_"):
            raise AttributeError(attr)
        if self._source is None:
            module, _, name = self._path.rpartition(".")
            self._source = getattr(importlib.import_module(module), name)()
        return getattr(self._source, attr)


@hookimpl
def data_sources() -> dict[str, LazySource]:
    return {
        "offline": LazySource(OfflineOptions, "meshtrain_data.offline.OfflineSource"),
        "hf": LazySource(HFOptions, "meshtrain_data.hf.HFSource"),
        "synthetic": LazySource(SyntheticOptions, "meshtrain_data.synthetic.SyntheticSource"),
    }
