"""Materialise this rank's weights: the same full values whatever the layout, then sharded.

Deterministic init: each parameter's full value comes from the family, drawn from a generator
seeded by (train.seed, parameter name), and each rank keeps its slice. Hugging Face import: each
rank reads only its slice from the safetensors files. A tied copy on the last pipeline stage is
filled under its partner's name, so both ends start equal.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from meshtrain.contracts import StackedKeys
from meshtrain.errors import UserError, first_line


def param_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def init_weights(
    stages: list[nn.Module], family: Any, model_config: Any, seed: int, tied: dict[str, str]
) -> None:
    """Deterministic init of every parameter of `stages` (already on their device)."""

    def local_value(name: str, param: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(param_seed(seed, name))
        full = family.init_parameter(name, param.shape, model_config, generator)
        if not isinstance(param, DTensor):
            return full
        # src_data_rank=None: every rank holds the full value, so slice without messages.
        return distribute_tensor(
            full, param.device_mesh, param.placements, src_data_rank=None
        ).to_local()

    fill_parameters(stages, tied, local_value)


def load_hf_weights(
    stages: list[nn.Module], folder: Path, tied: dict[str, str], hf_keys: dict[str, str]
) -> None:
    """Fill parameters from a Hugging Face safetensors checkpoint (one file or sharded with an
    index), reading only this rank's slice of each tensor. `hf_keys` maps stage names to file
    keys where they differ (StagePlan.hf_keys)."""
    from safetensors import safe_open

    files = _safetensors_files(folder)
    handles = {f: safe_open(str(f), framework="pt") for f in set(files.values())}

    def local_value(name: str, param: torch.Tensor) -> torch.Tensor:
        spec = hf_keys.get(name, name)
        if isinstance(param, DTensor):
            shape, offset = compute_local_shape_and_global_offset(
                param.shape, param.device_mesh, param.placements
            )
        else:
            shape, offset = param.shape, (0,) * param.dim()
        where = tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))
        if isinstance(spec, StackedKeys):  # read only this rank's entries along dim 0
            entries = [
                torch.cat([read(key, None) for key in spec.keys[i]])
                for i in range(where[0].start, where[0].stop)
            ]
            for entry in entries:
                _check_shape(folder, spec.keys[0][0] + " (stacked)", entry.shape, param.shape[1:])
            return torch.stack([entry[where[1:]] for entry in entries])
        return read(spec, param.shape, where)

    def read(key: str, expected: Any, where: tuple | None = None) -> torch.Tensor:
        if key not in files:
            raise UserError(f"model.name: {folder} has no tensor {key!r}")
        tensor = handles[files[key]].get_slice(key)
        if expected is not None:
            _check_shape(folder, key, tensor.get_shape(), expected)
        return tensor[where] if where else tensor[:]

    fill_parameters(stages, tied, local_value)


def _check_shape(folder: Path, key: str, found: Any, expected: Any) -> None:
    if list(found) != list(expected):
        raise UserError(
            f"model.name: {folder}: {key} has shape {list(found)}, "
            f"the model expects {list(expected)}"
        )


def fill_parameters(
    stages: list[nn.Module],
    tied: dict[str, str],
    local_value: Callable[[str, torch.Tensor], torch.Tensor],
) -> None:
    """Copy `local_value(name, param)` into each parameter's local tensor."""
    with torch.no_grad():
        for stage in stages:
            for name, param in stage.named_parameters():
                value = local_value(tied.get(name, name), param)
                local = param.to_local() if isinstance(param, DTensor) else param
                local.copy_(value.to(local.dtype))


def pretrained_folder(name: str) -> Path:
    """A local folder with the weights of `name` (a folder, or a hub id when the hub answers)."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, allow_patterns=["*.safetensors", "*.json"]))


def _safetensors_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> file, from model.safetensors.index.json or the single model file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: folder / file for name, file in weight_map.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise UserError(
                f"model.name: {index} is not a safetensors index ({type(err).__name__}: {err})"
            ) from None
    single = folder / "model.safetensors"
    if not single.is_file():
        raise UserError(
            f"model.name: {folder} has no model.safetensors or "
            "model.safetensors.index.json (model.pretrained = true needs weights)"
        )
    from safetensors import safe_open

    try:
        with safe_open(str(single), framework="pt") as handle:
            return {name: single for name in handle.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors' own error types for truncated or garbled files
        text = first_line(err)
        raise UserError(
            f"model.name: {single} is not a readable safetensors file ({text})"
        ) from None


FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
MAX_LINES = 5


def hf_weight_problems(job: Any) -> list[str]:
    """Before workers start: model.name's safetensors files open, and hold every tensor the
    model needs with its shape and a floating dtype. Reads headers only. A hub id is checked
    when downloaded."""
    from safetensors import safe_open

    from meshtrain.pipeline import split_model

    folder = Path(job.config.model.name).expanduser()
    if not folder.is_dir():
        return []
    try:
        files = _safetensors_files(folder)
    except UserError as err:
        return err.problems
    handles, problems = {}, []
    for path in sorted(set(files.values())):
        try:
            handles[path] = safe_open(str(path), framework="pt")
        except Exception as err:  # safetensors raises its own errors for truncated headers
            text = first_line(err)
            problems.append(f"model.name: {path} is not a readable safetensors file ({text})")
    if problems:
        return problems
    with torch.device("meta"):
        model = job.family.build(job.model_config)
    num_layers = job.shape.num_layers
    (stage,) = split_model(job.family, model, num_layers, [0], 1)
    hf_keys = job.family.plan(stage, sequence_parallel=False).hf_keys
    copies = {copy for _, copy in job.family.tied_parameters(job.model_config)}
    missing, wrong = [], []
    for name, param in stage.named_parameters():
        if name in copies:
            continue
        spec = hf_keys.get(name, name)
        groups = spec.keys if isinstance(spec, StackedKeys) else ((spec,),)
        expected = param.shape[1:] if isinstance(spec, StackedKeys) else param.shape
        if len(groups) != (param.shape[0] if isinstance(spec, StackedKeys) else 1):
            wrong.append(f"{name}: {len(groups)} stacked entries for shape {list(param.shape)}")
            continue
        for group in groups:
            absent = [key for key in group if key not in files]
            missing += absent
            if absent:
                continue
            slices = [handles[files[key]].get_slice(key) for key in group]
            shapes = [s.get_shape() for s in slices]
            found = [sum(shape[0] for shape in shapes), *shapes[0][1:]]
            label = group[0] if len(group) == 1 else " + ".join(group)
            if list(found) != list(expected):
                wrong.append(f"{label} has shape {found}, the model needs {list(expected)}")
            elif any(s.get_dtype() not in FLOAT_DTYPES for s in slices):
                wrong.append(f"{label} holds {slices[0].get_dtype()}, not floating-point weights")
    if missing:
        more = f" and {len(missing) - MAX_LINES} more" if len(missing) > MAX_LINES else ""
        problems.append(
            f"model.name: {folder} lacks {len(missing)} tensor(s) the model needs: "
            f"{', '.join(missing[:MAX_LINES])}{more}"
        )
    problems += [f"model.name: {folder}: {line}" for line in wrong[:MAX_LINES]]
    if len(wrong) > MAX_LINES:
        problems.append(f"model.name: {folder}: {len(wrong) - MAX_LINES} more tensors differ")
    return problems
