"""`meshtrain.job`: model.family = "auto" picks the family from model.name's config.json.

python -m pytest -q tests/test_job.py
"""

import json
from pathlib import Path

import pytest

from meshtrain.config import load_config
from meshtrain.errors import ConfigError
from meshtrain.job import resolve_job


def write(tmp_path: Path, config_json: str | None, model: str = "") -> Path:
    folder = tmp_path / "hf"
    folder.mkdir(exist_ok=True)
    if config_json is not None:
        (folder / "config.json").write_text(config_json)
    path = tmp_path / "run.toml"
    path.write_text(f'[model]\nname = "{folder}"\n{model}[data]\nsource = "synthetic"\n')
    return path


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_auto_picks_the_family_that_declares_the_model_type(tmp_path, model_type):
    values = {
        "model_type": model_type,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 128,
        "head_dim": 8,
    }
    job = resolve_job(load_config(write(tmp_path, json.dumps(values))))
    assert job.family_name == model_type
    assert job.shape.num_layers == 2 and job.shape.head_dim == 8


@pytest.mark.parametrize(
    ("config_json", "model", "fragment"),
    [
        ('{"model_type": "bert"}', "", "is a 'bert' model (model_type) and no installed family"),
        ("{not json", "", "is not valid JSON"),
        (None, "", "has no config.json"),
        ('{"hidden_size": 8}', "", "names no model_type"),
    ],
)
def test_auto_problems_are_one_line_naming_model_name(tmp_path, config_json, model, fragment):
    path = write(tmp_path, config_json, model)
    with pytest.raises(ConfigError) as info:
        resolve_job(load_config(path))
    (line,) = info.value.problems
    assert line.startswith(f"{path}: model.name: ") and fragment in line
    if "bert" in fragment:
        assert "llama (llama)" in line and "qwen3 (qwen3)" in line


def test_auto_without_a_name_asks_for_the_family(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[model]\nhidden_size = 32\n")
    with pytest.raises(ConfigError) as info:
        resolve_job(load_config(path))
    assert info.value.problems == [
        f"{path}: model.family: 'auto' needs model.name (a folder with config.json or a hub id); "
        "for an inline architecture set model.family"
    ]


def test_no_gpu_device_files_means_no_cuda_without_asking_torch(tmp_path, monkeypatch):
    """run.device = "auto" on a Linux machine without a GPU driver's device files is the CPU,
    answered without importing torch (the launcher starts its forkserver before torch loads)."""
    import sys

    from meshtrain import job

    if sys.platform != "linux":
        pytest.skip("device files are a Linux fact")
    monkeypatch.setattr(job, "GPU_DEVICE_FILES", (str(tmp_path / "nvidiactl"),))
    monkeypatch.setitem(sys.modules, "torch", None)  # importing torch would raise
    assert job.cuda_available() is False
    (tmp_path / "nvidiactl").touch()
    with pytest.raises(ImportError):
        job.cuda_available()  # a device file: torch is asked
