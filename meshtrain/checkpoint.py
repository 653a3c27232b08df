"""Native checkpoints: torch.distributed.checkpoint (each rank writes its own shards), exact resume,
resharding into another layout.

    <run.dir>/checkpoints/step_00000010/   complete: DCP shards + rank<r>.pt + meta.json
    <run.dir>/checkpoints/.step_00000012.partial/   being written (or killed): never resumed

Model and optimizer go through DCP `Stateful`s built on `torch.distributed.checkpoint.state_dict`
(`get_*_state_dict` / `set_*_state_dict`, which know FSDP2 and DTensor); keys are parameter names
(a tied copy is stored once, under its partner's name), so a checkpoint loads into any (dp, pp, tp,
dp_shard, schedule) layout of the same model. What is not a tensor (step, LR schedule position, data
position, RNG) is small: meta.json and one rank<r>.pt per rank, read with weights_only.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import (
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from meshtrain.config import Config
from meshtrain.errors import UserError
from meshtrain.resume import META, is_complete, read_meta

log = logging.getLogger("meshtrain")


def layout_of(config: Config) -> list:
    par = config.parallel
    return [par.dp, par.pp, par.tp, par.fsdp]


def save(
    root: Path,
    step: int,
    states: dict[str, Any],
    rank_state: dict[str, Any],
    meta: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step` under `root`: DCP tensors of `states` (Statefuls), this rank's
    `rank_state`, and rank 0's `meta`. It becomes visible (renamed) only once complete."""
    rank = dist.get_rank()
    final, partial = root / f"step_{step:08d}", root / f".step_{step:08d}.partial"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    try:
        dcp.save(states, checkpoint_id=partial)
        torch.save(rank_state, partial / f"rank{rank}.pt")
        dist.barrier()
        if rank == 0:
            (partial / META).write_text(json.dumps({"step": step, **meta}, indent=1, default=str))
            shutil.rmtree(final, ignore_errors=True)  # the same step saved again after a restart
            partial.rename(final)
            _prune(root, keep)
            log.info("saved checkpoint %s", final)
    except (OSError, CheckpointException) as err:  # e.g. the disk filled up
        shutil.rmtree(partial, ignore_errors=True)
        done = sorted(p.name for p in root.glob("step_*") if is_complete(p))
        kept = f"the newest complete one, {done[-1]}, is intact" if done else "none was complete"
        raise UserError(
            f"checkpoint: cannot write step {step} to {root} ({_os_reason(err)}); {kept}"
        ) from err
    dist.barrier()
    return final


def _os_reason(err: BaseException) -> str:
    """The OS error inside `err` (DCP wraps each rank's failure), as one short phrase."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError):
            return seen.strerror or str(seen)
        seen = seen.__cause__ or seen.__context__
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1][:200] if lines else type(err).__name__


def load(path: Path, states: dict[str, Any], layout: list) -> tuple[dict, dict]:
    """Load `states` from checkpoint `path`; returns (meta, this rank's rank_state). In another
    layout every rank takes rank 0's rank_state (the data position is global)."""
    load_tensors(states, path, "checkpoint.resume")
    meta = read_meta(path, "checkpoint.resume")
    own = path / f"rank{dist.get_rank()}.pt"
    same_layout = meta.get("layout") == layout and own.is_file()
    return meta, torch.load(own if same_layout else path / "rank0.pt", weights_only=True)


def load_tensors(state: dict[str, Any], path: Path, where: str, no_dist: bool = False) -> None:
    """dcp.load through `SafeReader`; a checkpoint of another model is a UserError naming it."""
    reader = SafeReader(path)
    reader.read_metadata()  # unsafe or unreadable: a UserError now, before DCP wraps it
    try:
        with warnings.catch_warnings():  # no_dist: DCP warns that it assumes one process
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(state, storage_reader=reader, no_dist=no_dist)
    except (Exception, CheckpointException) as err:  # (the latter is a BaseException)
        # A missing key or another shape: not this model's checkpoint.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise UserError(
            f"{where}: {path} does not fit this model "
            f"({lines[-1][:300] if lines else type(err).__name__})"
        ) from err


def restore_lr_schedule(schedule: Any, step: int) -> None:
    """Put the schedule (and the optimizer's lr, which its state_dict does not hold) at `step`.

    Only the step is restored, not the saved state_dict: its per-group lists are as long as the
    saving layout's parameter groups, which differ between layouts."""
    schedule.last_epoch = step - 1
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": on purpose
        warnings.simplefilter("ignore", UserWarning)
        schedule.step()  # sets every group's lr to base_lr * factor(step), as training would


class SafeReader(dcp.FileSystemReader):
    """DCP's reader, except that `.metadata` is unpickled with an allowlist of DCP's own classes
    (FileSystemReader uses plain pickle.load) and only tensor entries are accepted (a bytes entry
    would be read with torch.load(weights_only=False)). Tensors are read with weights_only=True."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as handle:
                metadata = _MetadataUnpickler(handle).load()
        except OSError as err:
            raise UserError(f"checkpoint {self.path}: cannot read {path} ({err})") from None
        except pickle.UnpicklingError as err:
            raise UserError(f"checkpoint {self.path}: {path}: {err}") from None
        if not isinstance(metadata, Metadata):
            raise UserError(f"checkpoint {self.path}: {path} is not DCP metadata")
        for key, item in metadata.state_dict_metadata.items():
            if not isinstance(item, TensorStorageMetadata):
                raise UserError(
                    f"checkpoint {self.path}: entry {key!r} is not a tensor; "
                    "meshtrain only loads tensors"
                )
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


_SAFE_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            (module, name) in _SAFE_GLOBALS
            or (module == "torch.distributed.checkpoint.metadata" and not name.startswith("__"))
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


class ModelState:
    """DCP Stateful of this rank's stages: parameters by name, a tied copy under its partner's."""

    def __init__(self, stages: list[nn.Module], tied: dict[str, str]):
        self.stages, self.tied = stages, tied

    def state_dict(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for stage in self.stages:
            for name, value in get_model_state_dict(stage).items():
                merged.setdefault(self.tied.get(name, name), value)
        return merged

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for stage in self.stages:
            names = get_model_state_dict(stage).keys()
            set_model_state_dict(stage, {n: state[self.tied.get(n, n)] for n in names})


class OptimizerState:
    """DCP Stateful of the optimizer: per-parameter state tensors keyed `<name>.<field>` through
    the flattened optimizer state dict. Hyperparameters come from the config and the LR schedule,
    so only tensors are saved (no pickled entries)."""

    def __init__(
        self, stages: list[nn.Module], optimizer: torch.optim.Optimizer, tied: dict[str, str]
    ):
        self.model = nn.ModuleList(stages)  # names "<i>.<name>": one module for the API
        self.optimizer, self.tied = optimizer, tied
        self.options = StateDictOptions(flatten_optimizer_state_dict=True)

    def _full(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer, options=self.options)

    def _key(self, flat: str) -> str:
        name, _, field = flat.removeprefix("state.").partition(".")[2].rpartition(".")
        return f"{self.tied.get(name, name)}.{field}"

    def state_dict(self) -> dict[str, Any]:
        return {self._key(k): v for k, v in self._full().items() if k.startswith("state.")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        full = self._full()
        for key in full:
            if key.startswith("state."):
                full[key] = state[self._key(key)]
        set_optimizer_state_dict(self.model, self.optimizer, full, options=self.options)


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step_*") if is_complete(p))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
