"""`meshtrain export`: a consolidated Hugging Face folder from a native (DCP) checkpoint.

    meshtrain export runs/tiny_cpu OUT_DIR                         # newest complete checkpoint
    meshtrain export runs/tiny_cpu/checkpoints/step_00000010 OUT_DIR

One process, no process group: the full model is built on CPU from the config saved with the
checkpoint, its tensors are read from every rank's shards (DCP reshards to one), and
`save_pretrained` writes config.json, generation_config.json and safetensors weights (sharded when
large); the run's tokenizer (`<run.dir>/tokenizer/`) is copied along. The folder appears only once
complete, and an existing non-empty OUT_DIR is never touched.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meshtrain.checkpoint import load_tensors
from meshtrain.config import config_from_raw
from meshtrain.errors import UserError
from meshtrain.resume import META, is_complete, read_meta

log = logging.getLogger("meshtrain")


def export_checkpoint(source: Path, out: Path, max_shard_size: str = "2GB") -> Path:
    """Write the Hugging Face folder `out` from `source` (a run dir or a checkpoint folder)."""
    source, out = Path(source), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(
            f"export: {out} already exists and is not empty; choose a new OUT_DIR "
            "(nothing was overwritten)"
        )
    path = resolve_checkpoint(source)
    family, model = load_full_model(path)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        family.export(model, tmp, max_shard_size)
        tokenizer = path.parent.parent / "tokenizer"
        if tokenizer.is_dir():
            shutil.copytree(tokenizer, tmp, dirs_exist_ok=True)
        if out.is_dir():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s -> %s", path, out)
    return out


def resolve_checkpoint(source: Path, command: str = "export") -> Path:
    """The checkpoint folder `source` names: itself, or a run dir's newest complete checkpoint.
    Errors start with `command` (export, sample)."""
    source = Path(source)
    if not source.exists():
        raise UserError(f"{command}: {source} does not exist (expected a run dir or a checkpoint)")
    if (source / META).is_file():
        if not is_complete(source):
            raise UserError(
                f"{command}: {source} is an unfinished checkpoint (being written or "
                "killed); use a step_* folder"
            )
        return source
    root = source / "checkpoints"
    if root.is_dir():
        done = sorted(p for p in root.glob("step_*") if is_complete(p))
        if not done:
            raise UserError(
                f"{command}: {source} has no complete checkpoint in {root} "
                "(set checkpoint.every to save some)"
            )
        return done[-1]
    if source.name.startswith(("step_", ".step_")):
        raise UserError(f"{command}: {source} is an incomplete checkpoint (no {META})")
    raise UserError(
        f"{command}: {source} is not a meshtrain run dir (no checkpoints/ folder) "
        f"or checkpoint (no {META})"
    )


def load_full_model(path: Path) -> tuple[Any, nn.Module]:
    """The family and the whole model on CPU (fp32) with the weights of checkpoint `path`."""
    family, model_config = _family_and_config(path)
    with torch.device("meta"):
        model = family.build(model_config)
    model.to_empty(device="cpu")
    family.init_buffers(model)
    pairs = family.tied_parameters(model_config)
    for source, copy in pairs:  # to_empty unties shared weights
        owner, _, attr = copy.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(source))
    copies = {copy for _, copy in pairs}
    params = {
        name: p.data
        for name, p in model.named_parameters(remove_duplicate=False)
        if name not in copies
    }
    load_tensors({"model": params}, path, "export", no_dist=True)
    return family, model.eval()


def _family_and_config(path: Path) -> tuple[Any, Any]:
    from meshtrain.plugins import Plugins

    where = f"{path / META}"
    meta = read_meta(path, "export")
    if not isinstance(meta.get("config"), dict):
        raise UserError(f"export: {where} holds no config")
    config = config_from_raw(path / META, meta["config"])
    family = Plugins(config.plugins.disable).get(
        "model_families", meta.get("family") or config.model.family, f"{where}: model.family"
    )
    model_config, problems = family.parse_config(
        config.model.options,
        name=config.model.name or None,
        trust_remote_code=config.model.trust_remote_code,
        where=f"{where}: model",
    )
    if problems:
        raise UserError(problems)
    return family, model_config
