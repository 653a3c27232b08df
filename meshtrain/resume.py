"""Which checkpoint a run resumes from, and whether it holds the configured model.

    <run.dir>/checkpoints/step_00000010/meta.json    complete (see meshtrain/checkpoint.py)

Only meta.json is read, so `meshtrain check` answers without torch; meshtrain/checkpoint.py
writes and loads the tensors.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshtrain.config import Config
from meshtrain.errors import UserError

if TYPE_CHECKING:
    from meshtrain.job import Job

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
    if meta.get("family") != job.family_name:
        raise UserError(
            f"{job.config.path}: checkpoint.resume: {path} holds a "
            f"{meta.get('family')!r} model, the config trains "
            f"{job.family_name!r} (model.family)"
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
