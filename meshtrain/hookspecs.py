"""Every hook a meshtrain plugin can implement (pluggy project name "meshtrain").

Catalog hooks return `{name: provider}`; the TOML selects a provider by name. Observer hooks are
called on every rank with that rank's number; they must not run collectives or change the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pluggy

from meshtrain.contracts import DataSource, ModelFamily, PipelineSchedule

hookspec = pluggy.HookspecMarker("meshtrain")


@hookspec
def model_families() -> dict[str, ModelFamily]:
    """Model families this plugin provides, by the name `[model] family` selects."""


@hookspec
def pipeline_schedules() -> dict[str, PipelineSchedule]:
    """Pipeline schedules this plugin provides, by the name `[pipeline] schedule` selects."""


@hookspec
def data_sources() -> dict[str, DataSource]:
    """Data sources this plugin provides, by the name `[data] source` selects."""


@hookspec
def on_train_start(config: Any, rank: int) -> None:
    """Called once per rank after the model is built and weights are loaded, before step 1."""


@hookspec
def on_step_end(config: Any, rank: int, step: int, metrics: dict[str, Any]) -> None:
    """Called on every rank after each optimizer step with that step's global metrics."""


@hookspec
def on_eval_end(config: Any, rank: int, step: int, metrics: dict[str, Any]) -> None:
    """Called on every rank after an evaluation at `step` with eval_loss, eval_ppl, eval_tokens
    and eval_time_s (the same on every rank)."""


@hookspec
def on_checkpoint_saved(config: Any, rank: int, step: int, path: Path) -> None:
    """Called on every rank after a checkpoint at `step` is complete at `path`."""


@hookspec
def on_train_end(config: Any, rank: int, metrics: dict[str, Any]) -> None:
    """Called once per rank after the last step with the last step's metrics."""
