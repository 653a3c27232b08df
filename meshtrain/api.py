"""The public plugin API: everything a plugin may import from meshtrain, and nothing else.

    from meshtrain.api import hookimpl, StagePlan, ModelShape, ParamSpec, UserError, parse_section

Built-in plugins import only this module (a test checks), so a third-party plugin written against
it keeps working while the core changes underneath. Names that need torch (the parallel styles)
load on first use, so a plugin that only declares its catalog stays cheap to import.
"""

from __future__ import annotations

from typing import Any

from meshtrain import hookimpl
from meshtrain.config import parse_section
from meshtrain.contracts import (
    IGNORE_INDEX,
    Batch,
    DataContext,
    DataSource,
    DataStream,
    ModelFamily,
    ModelShape,
    ParamSpec,
    PipelineSchedule,
    StackedKeys,
    StagePlan,
)
from meshtrain.errors import ConfigError, UserError, first_line, suggest
from meshtrain.hub import hub_offline, hub_problem, looks_like_hub_id, offline_error, require_hub
from meshtrain.preflight import cache_dir, write_cache

_LAZY = {
    "ChannelShardedNorm": "meshtrain.tensor_parallel",
    "ExpertParallel": "meshtrain.experts",
    "FusedColwiseParallel": "meshtrain.tensor_parallel",
    "KeyValueParallel": "meshtrain.tensor_parallel",
    "VocabParallelEmbedding": "meshtrain.tensor_parallel",
    "local_kv_groups": "meshtrain.tensor_parallel",
}

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "ConfigError",
    "DataContext",
    "DataSource",
    "DataStream",
    "ModelFamily",
    "ModelShape",
    "ParamSpec",
    "PipelineSchedule",
    "StackedKeys",
    "StagePlan",
    "UserError",
    "cache_dir",
    "first_line",
    "hookimpl",
    "hub_offline",
    "hub_problem",
    "looks_like_hub_id",
    "offline_error",
    "parse_section",
    "require_hub",
    "suggest",
    "write_cache",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'meshtrain.api' has no attribute {name!r}")
