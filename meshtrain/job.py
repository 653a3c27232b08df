"""A Job: a checked config with its plugins resolved, ready to launch.

`resolve_job` selects the model family, schedule and data source the config names, lets each check
its own keys, then checks degrees against the model (tp vs heads, pp vs layers, ...). Every problem
is collected and raised together as one ConfigError.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshtrain.config import Config, parse_section
from meshtrain.contracts import DataSource, ModelFamily, ModelShape, PipelineSchedule
from meshtrain.degrees import check_degrees
from meshtrain.errors import ConfigError, UserError, suggest
from meshtrain.hub import hub_problem
from meshtrain.plugins import Plugins, entry_point_names

log = logging.getLogger("meshtrain")


@dataclass(frozen=True)
class Job:
    config: Config
    plugins: Plugins
    family_name: str
    """The family `model.family` names, or the one "auto" found for model.name's model_type."""
    family: ModelFamily
    model_config: Any
    """parse_config's config, or, resolved with `declared`, possibly declared_config's."""
    shape: ModelShape
    schedule: PipelineSchedule
    source: DataSource
    data_options: Any
    warnings: list[str]

    @property
    def num_stages(self) -> int:
        """Pipeline stages in all: pp ranks times the stages each holds."""
        return self.config.parallel.pp * self.schedule.stages_per_rank

    @property
    def seq_shards(self) -> int:
        """How many sequence shards hidden states travel in (tp under sequence parallel)."""
        par = self.config.parallel
        return par.tp if par.sequence_parallel and par.tp > 1 else 1

    @property
    def reshard_after_forward(self) -> str:
        """Which FSDP2 units free their gathered weights after forward (see
        parallel.reshard_after_forward): "all", "undeclared" (all but a plan's keep_gathered) or
        "none"."""
        mode = self.config.parallel.reshard_after_forward
        if mode == "auto":
            return "none" if self.schedule.splits_backward else "undeclared"
        return "all" if mode == "always" else "none"

    @property
    def sync_each_microbatch(self) -> bool:
        """FSDP2 reduces gradients after every micro-batch (see parallel.grad_sync)."""
        return self.config.parallel.grad_sync == "microbatch"

    @property
    def worker_imports(self) -> list[str]:
        """The modules the run's family, schedule and data source say their workers import
        (`worker_imports`), for a process that forks workers to import once."""
        names = []
        for plugin in (self.family, self.schedule, self.source):
            names += list(getattr(plugin, "worker_imports", ()))
        return names

    @property
    def device_type(self) -> str:
        return device_type(self.config.run.device)


GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/kfd")
"""Without one of these a Linux machine has no GPU torch could use."""


def resolve_job(
    config: Config,
    extra_plugins: list[Any] = (),
    *,
    preflight: bool = False,
    planning: bool = False,
    declared: bool = False,
) -> Job:
    """Load plugins and check everything that can be checked before starting processes.

    `preflight` (the CLI's check and run, not the workers): also read files -- the data
    source's `check` (files, tokenizer, columns), the run dir, the checkpoint to resume and
    model.name's weights (meshtrain.preflight). `planning` (meshtrain plan): the run's device
    need not be on this machine. `declared` (meshtrain check): the model config as the family
    declares it, where it can (see `resolve_model_config`)."""
    where = str(config.path)
    problems: list[str] = []
    known = entry_point_names()
    disable = [name for name in config.plugins.disable if isinstance(name, str)]
    for name in config.plugins.disable:
        if not isinstance(name, str):
            problems.append(f"{where}: plugins.disable: expected plugin names, got {name!r}")
        elif name not in known:
            problems.append(f"{where}: plugins.disable: no plugin {name!r}{suggest(name, known)}")
    plugins = Plugins(disable, extra_plugins)

    def pick(hook: str, name: str, key: str) -> Any:
        try:
            return plugins.get(hook, name, f"{where}: {key}")
        except UserError as err:
            problems.extend(err.problems)
            return None

    family_name = config.model.family
    if family_name == "auto":
        family_name, problem = pick_family(config, plugins)
        problems += [problem] if problem else []
    family = pick("model_families", family_name, "model.family") if family_name else None
    schedule = pick("pipeline_schedules", config.pipeline.schedule, "pipeline.schedule")
    source = pick("data_sources", config.data.source, "data.source")
    model_config = shape = data_options = None
    if family is not None:
        model_config, found = resolve_model_config(family, config, declared=declared)
        problems += found
        if not found:
            shape = family.shape(model_config)
    if source is not None:
        data_options, found = parse_section(
            source.config_class, config.data.options, f"{where}: data"
        )
        problems += found
        if config.eval.enabled and not callable(getattr(source, "open_eval", None)):
            problems.append(
                f"{where}: eval.every: data source {config.data.source!r} has no held-out data "
                "(its plugin defines no open_eval); set eval.every = 0 or use another source"
            )
    if shape is not None and schedule is not None:
        problems += check_degrees(config, shape, schedule)
    if config.model.pretrained and not config.model.name:
        problems.append(f"{where}: model.pretrained: true needs model.name (hub id or folder)")
    if config.run.device == "cuda" and not planning and not cuda_available():
        problems.append(f"{where}: run.device: 'cuda' but no CUDA device is visible; use 'cpu'")
    if preflight and source is not None and data_options is not None:
        from meshtrain.preflight import data_problems

        problems += data_problems(source, data_options, config, shape)
    if problems:
        raise ConfigError(problems)
    job = Job(
        config=config,
        plugins=plugins,
        family_name=family_name,
        family=family,
        model_config=model_config,
        shape=shape,
        schedule=schedule,
        source=source,
        data_options=data_options,
        warnings=_no_effect_warnings(config),
    )
    if preflight:
        from meshtrain.preflight import run_problems

        problems = run_problems(job)
        if problems:
            raise ConfigError(problems)
    return job


def resolve_model_config(
    family: ModelFamily, config: Config, *, declared: bool
) -> tuple[Any, list[str]]:
    """The family's model config from `[model]`, and problem lines.

    With `declared`, a family that declares `stage_parameters` may answer from `declared_config`
    (no model code imported; the job is then only read, by `meshtrain check`); where it cannot be
    sure that agrees with parse_config (None), parse_config answers."""
    kwargs = {
        "name": config.model.name or None,
        "trust_remote_code": config.model.trust_remote_code,
        "where": f"{config.path}: model",
    }
    quick = getattr(family, "declared_config", None)
    if declared and callable(quick) and callable(getattr(family, "stage_parameters", None)):
        answer = quick(config.model.options, **kwargs)
        if answer is not None:
            return answer
    return family.parse_config(config.model.options, **kwargs)


def device_type(run_device: str) -> str:
    """The device type `run.device` names: "auto" is cuda when torch sees a GPU, else cpu."""
    if run_device == "auto":
        return "cuda" if cuda_available() else "cpu"
    return run_device


def cuda_available() -> bool:
    """Whether torch sees a CUDA device; torch loads only here, where the answer is needed
    (`meshtrain check` of a CPU config never imports it), and not at all on a Linux machine
    without a GPU driver's device files (NVIDIA's, or ROCm's for torch's HIP build)."""
    if sys.platform == "linux" and not any(Path(f).exists() for f in GPU_DEVICE_FILES):
        return False
    import torch

    return torch.cuda.is_available()


def pick_family(config: Config, plugins: Plugins) -> tuple[str | None, str]:
    """`model.family = "auto"`: the installed family that declares model.name's model_type."""
    where, name = config.path, config.model.name
    if not name:
        return None, (
            f"{where}: model.family: 'auto' needs model.name (a folder with "
            "config.json or a hub id); for an inline architecture set model.family"
        )
    kind, problem = read_model_type(name, f"{where}: model.name")
    if problem:
        return None, problem
    catalog = plugins.catalogs["model_families"]
    found = [
        family
        for family, (provider, _) in sorted(catalog.items())
        if kind in getattr(provider, "model_types", ())
    ]
    if not found:
        installed = (
            ", ".join(
                f"{family} ({', '.join(getattr(provider, 'model_types', ())) or '-'})"
                for family, (provider, _) in sorted(catalog.items())
            )
            or "none"
        )
        return None, (
            f"{where}: model.name: {name} is a {kind!r} model (model_type) and no "
            f"installed family trains it; families (model types): {installed}"
        )
    return found[0], ""


def read_model_type(name: str, where: str) -> tuple[str | None, str]:
    """model_type from `name`'s config.json (a folder, or the hub when it answers)."""
    folder = Path(name).expanduser()
    if not folder.is_dir():
        problem = hub_problem(
            name,
            where,
            "download it and set model.name to its folder, or "
            "set model.family and write the architecture inline",
        )
        if problem:
            return None, problem
        try:
            from huggingface_hub import hf_hub_download

            folder = Path(hf_hub_download(name, "config.json")).parent
        except Exception as err:  # noqa: BLE001 (any hub failure is the user's to fix)
            return None, f"{where}: cannot fetch config.json of {name!r} ({type(err).__name__})"
    path = folder / "config.json"
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        return None, f"{where}: folder {name} has no config.json"
    except (OSError, ValueError) as err:
        return None, f"{where}: {path} is not valid JSON ({str(err).splitlines()[0]})"
    kind = values.get("model_type") if isinstance(values, dict) else None
    if not isinstance(kind, str):
        return None, f"{where}: {path} names no model_type"
    return kind, ""


def _no_effect_warnings(config: Config) -> list[str]:
    par, warnings = config.parallel, []
    if par.dp_shard and par.dp == 1:
        warnings.append("parallel.dp_shard has no effect with parallel.dp = 1")
    if par.sequence_parallel and par.tp == 1:
        warnings.append("parallel.sequence_parallel has no effect with parallel.tp = 1")
    if par.pp == 1 and "schedule" in config.raw.get("pipeline", {}):
        warnings.append("pipeline.schedule has no effect with parallel.pp = 1")
    return warnings
