"""meshtrain_data: the built-in data sources of meshtrain.

    [data]
    source = "offline"    # default: Python's own docs and sources, BPE trained on them, no network
    source = "hf"         # a Hugging Face dataset (hub id or local txt/json/jsonl/parquet files)
    source = "synthetic"  # random tokens for benchmarks

Found by the core through the entry point `meshtrain_data = "meshtrain_data"` (group "meshtrain").
Each source's `prepare` runs once per node before the workers `open` their streams.
"""

from __future__ import annotations

from meshtrain.api import DataSource, hookimpl
from meshtrain_data.hf import HFSource
from meshtrain_data.offline import OfflineSource
from meshtrain_data.synthetic import SyntheticSource

__version__ = "0.1.0"


@hookimpl
def data_sources() -> dict[str, DataSource]:
    return {"offline": OfflineSource(), "hf": HFSource(), "synthetic": SyntheticSource()}
