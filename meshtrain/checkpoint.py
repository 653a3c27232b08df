"""Native checkpoints: torch.distributed.checkpoint (each rank writes its own shards), exact resume,
resharding into another layout.

    <run.dir>/checkpoints/step_00000010/   complete: DCP shards + rank<r>.pt + meta.json
    <run.dir>/checkpoints/.step_00000012.partial/   being written (or killed): never resumed

Keys are Hugging Face parameter names (a tied copy is stored once, under its partner's name), so a
checkpoint loads into any (dp, pp, tp, dp_shard) layout of the same model.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import (
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)

from meshtrain.config import Config
from meshtrain.errors import UserError

if TYPE_CHECKING:
    from meshtrain.job import Job
    from meshtrain.train import Trainer

log = logging.getLogger("meshtrain")
META = "meta.json"


def checkpoints_dir(config: Config) -> Path:
    return config.run_dir / "checkpoints"


def is_complete(path: Path) -> bool:
    return (path / META).is_file() and not path.name.startswith(".")


def find_resume(config: Config) -> Path | None:
    """The checkpoint `checkpoint.resume` selects: auto = newest complete one, never, or a path."""
    mode = config.checkpoint.resume
    if mode == "never":
        return None
    if mode == "auto":
        root = checkpoints_dir(config)
        done = sorted(p for p in root.glob("step_*") if is_complete(p)) if root.is_dir() else []
        return done[-1] if done else None
    path = Path(mode)
    if not is_complete(path):
        raise UserError(
            f"{config.path}: checkpoint.resume: {path} is not a complete meshtrain "
            f"checkpoint (no {META}); use a step_* folder under <run.dir>/checkpoints"
        )
    return path


def check_resume(job: Job) -> Path | None:
    """Before workers start: the checkpoint to resume, checked against the model's shape."""
    path = find_resume(job.config)
    if path is None:
        return None
    meta = read_meta(path, f"{job.config.path}: checkpoint.resume")
    if meta.get("family") != job.config.model.family:
        raise UserError(
            f"{job.config.path}: checkpoint.resume: {path} holds a "
            f"{meta.get('family')!r} model, the config trains "
            f"{job.config.model.family!r} (model.family)"
        )
    saved = meta.get("shape")
    if saved != asdict(job.shape):
        diff = (
            ", ".join(
                f"{k} {saved.get(k)} vs {v}"
                for k, v in asdict(job.shape).items()
                if saved and saved.get(k) != v
            )
            or "no shape recorded"
        )
        raise UserError(
            f"{job.config.path}: checkpoint.resume: {path} holds a different model "
            f'({diff}); use checkpoint.resume = "never" or another run.dir'
        )
    return path


def read_meta(path: Path, where: str) -> dict[str, Any]:
    """A checkpoint's meta.json; UserError naming `where` and the path when it is unreadable."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{where}: {path / META} is unreadable ({err})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{where}: {path / META} is not a meshtrain checkpoint description")
    return meta


def layout_of(config: Config) -> list:
    par = config.parallel
    return [par.dp, par.pp, par.tp, bool(par.dp_shard and par.dp > 1)]


def save(t: Trainer) -> Path:
    """Write a checkpoint of step `t.step`; it becomes visible (renamed) only once complete."""
    cfg, rank = t.job.config, t.mesh.rank
    root = checkpoints_dir(cfg)
    final, partial = root / f"step_{t.step:08d}", root / f".step_{t.step:08d}.partial"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    dcp.save(_tensors(t), checkpoint_id=partial)
    torch.save(
        {"rng": torch.get_rng_state(), "data": t.data.state_dict()}, partial / f"rank{rank}.pt"
    )
    dist.barrier()
    if rank == 0:
        meta = {
            "step": t.step,
            "lr_schedule": t.lr_schedule.state_dict(),
            "shape": asdict(t.job.shape),
            "config": cfg.raw,
            "world": t.mesh.world,
            "layout": layout_of(cfg),
            "family": cfg.model.family,
        }
        (partial / META).write_text(json.dumps(meta, indent=1, default=str))
        shutil.rmtree(final, ignore_errors=True)  # the same step saved again after a restart
        partial.rename(final)
        _prune(root, cfg.checkpoint.keep)
        log.info("saved checkpoint %s", final)
    dist.barrier()
    return final


def load(t: Trainer, path: Path) -> None:
    """Restore model, optimizer, LR schedule, step, data position and RNG from `path`."""
    _init_optimizer_state(t.optimizer)
    load_tensors(_tensors(t, with_copies=True), path, "checkpoint.resume")
    meta = read_meta(path, "checkpoint.resume")
    t.step = int(meta["step"])
    restore_lr_schedule(t.lr_schedule, t.step)
    own = path / f"rank{t.mesh.rank}.pt"
    same_layout = meta.get("layout") == layout_of(t.job.config) and own.is_file()
    # Another layout: the data position is global (every dp rank resumes from it); rank 0's RNG.
    extra = torch.load(own if same_layout else path / "rank0.pt", weights_only=True)
    t.data.load_state_dict(extra["data"])
    torch.set_rng_state(extra["rng"])
    if t.mesh.rank == 0:
        log.info("resumed from %s at step %d", path, t.step)


def load_tensors(state: dict[str, Any], path: Path, where: str, no_dist: bool = False) -> None:
    """dcp.load through `SafeReader`; a checkpoint of another model is a UserError naming it."""
    reader = SafeReader(path)
    reader.read_metadata()  # unsafe or unreadable: a UserError now, before DCP wraps it
    try:
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


def _tensors(t: Trainer, with_copies: bool = False) -> dict[str, Any]:
    """Model and optimizer tensors by checkpoint key. A tied copy shares its partner's key: it is
    loaded from it but not saved twice."""
    tied = {copy: source for source, copy in t.job.family.tied_parameters(t.job.model_config)}
    model, optim = {}, {}
    for name, p in zip(t.model.names, t.model.params, strict=True):
        key = tied.get(name, name)
        if key != name and not with_copies:
            continue
        model[key] = p
        for state_name, value in t.optimizer.state.get(p, {}).items():
            optim[f"{key}.{state_name}"] = value
    return {"model": model, "optim": optim}


def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """AdamW creates its state lazily; make it exist (zeros) so DCP can load into it, with the
    step counter where AdamW keeps it (on the parameter's device for fused/capturable)."""
    for group in optimizer.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            if p not in optimizer.state or not optimizer.state[p]:
                step = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
                optimizer.state[p] = {
                    "step": step,
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step_*") if is_complete(p))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
