"""The TOML loader: every kind of problem is one line naming the file and the dotted key.

python -m pytest -q tests/test_config.py
"""

from pathlib import Path

import pytest

from meshtrain.config import load_config
from meshtrain.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(path: Path, overrides: list[str] = ()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return info.value.problems


def test_shipped_configs_load():
    for name in ("tiny_cpu.toml", "smollm_cpu.toml"):
        config = load_config(ROOT / "configs" / name)
        assert config.model.family == "llama"
    smollm = load_config(ROOT / "configs" / "smollm_cpu.toml")
    assert (smollm.parallel.dp, smollm.parallel.pp, smollm.parallel.tp) == (2, 2, 2)
    assert smollm.world_size == 8 and smollm.parallel.dp_shard


def test_defaults_fill_missing_sections(tmp_path):
    config = load_config(write(tmp_path, "empty.toml", ""))
    assert config.train.steps == 20 and config.pipeline.schedule == "1f1b"
    assert config.run_dir == Path("runs") / "empty"


def test_unknown_table_and_key_suggest(tmp_path):
    path = write(tmp_path, "run.toml", "[paralel]\ndp = 2\n[parallel]\ntpp = 2\n")
    found = problems(path)
    assert f"{path}: paralel: unknown table (did you mean parallel?)" in found
    assert f"{path}: parallel.tpp: unknown key (did you mean parallel.tp?)" in found


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("parallel.dp", "true", "parallel.dp: expected an integer, got True"),
        ("train.steps", "2.5", "train.steps: expected an integer, got 2.5"),
        ("train.lr", '"fast"', "train.lr: expected a number, got 'fast'"),
        ("parallel.dp_shard", "1", "parallel.dp_shard: expected a boolean, got 1"),
    ],
)
def test_wrong_types(tmp_path, key, value, expected):
    table, name = key.split(".")
    path = write(tmp_path, "run.toml", f"[{table}]\n{name} = {value}\n")
    assert problems(path) == [f"{path}: {expected}"]


def test_int_is_accepted_where_a_float_is_due(tmp_path):
    config = load_config(write(tmp_path, "run.toml", "[train]\nlr = 1\n"))
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)


def test_out_of_range(tmp_path):
    path = write(tmp_path, "run.toml", "[parallel]\ntp = 0\n[train]\nlr = -1.0\n")
    assert problems(path) == [
        f"{path}: parallel.tp: 0 is out of range (must be >= 1)",
        f"{path}: train.lr: -1.0 is out of range (must be >= 0)",
    ]


def test_bad_choice_suggests(tmp_path):
    path = write(tmp_path, "run.toml", '[train]\nprecision = "bf61"\n')
    (line,) = problems(path)
    assert line.startswith(f"{path}: train.precision: 'bf61' is not one of 'auto', 'fp32', 'bf16'")
    assert line.endswith("(did you mean bf16?)")


def test_all_problems_reported_together(tmp_path):
    path = write(
        tmp_path,
        "run.toml",
        "[parallel]\ndp = true\ntpp = 2\n[train]\nsteps = 0\n[log]\nevry = 1\n",
    )
    found = problems(path)
    assert len(found) == 4
    assert all(line.startswith(f"{path}: ") for line in found)
    assert [line.split(": ")[1] for line in found] == [
        "parallel.dp",
        "parallel.tpp",
        "train.steps",
        "log.evry",
    ]


def test_base_one_level(tmp_path):
    write(tmp_path, "base.toml", "[parallel]\ndp = 2\ntp = 2\n[train]\nsteps = 5\n")
    child = write(tmp_path, "child.toml", 'base = "base.toml"\n[parallel]\ntp = 1\n')
    config = load_config(child)
    assert (config.parallel.dp, config.parallel.tp, config.train.steps) == (2, 1, 5)
    assert config.path == child and "base" not in config.raw


def test_base_chained(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path, "root.toml", "[train]\nsteps = 7\nseed = 1\n")
    write(tmp_path, "sub/middle.toml", 'base = "../root.toml"\n[train]\nseed = 2\n')
    top = write(tmp_path, "top.toml", 'base = "sub/middle.toml"\n[train]\nlr = 0.01\n')
    train = load_config(top).train
    assert (train.steps, train.seed, train.lr) == (7, 2, 0.01)


def test_missing_base(tmp_path):
    path = write(tmp_path, "run.toml", 'base = "nowhere.toml"\n')
    (line,) = problems(path)
    assert "base: file not found" in line and "nowhere.toml" in line


def test_missing_config_file(tmp_path):
    (line,) = problems(tmp_path / "absent.toml")
    assert "file not found" in line and "absent.toml" in line


def test_circular_base(tmp_path):
    write(tmp_path, "a.toml", 'base = "b.toml"\n')
    path = write(tmp_path, "b.toml", 'base = "a.toml"\n')
    (line,) = problems(path)
    assert "base: circular base chain" in line


def test_invalid_toml_is_one_line(tmp_path):
    path = write(tmp_path, "run.toml", "[train\nsteps = 1\n")
    (line,) = problems(path)
    assert line.startswith(f"{path}: invalid TOML")


def test_set_overrides_parse_toml(tmp_path):
    path = write(tmp_path, "run.toml", "[parallel]\ntp = 2\n")
    config = load_config(
        path,
        [
            "parallel.tp=1",
            "parallel.dp=4",
            'model.name="org/model"',
            "pipeline.schedule=gpipe",
            "train.lr=1e-3",
            "parallel.dp_shard=true",
        ],
    )
    assert (config.parallel.tp, config.parallel.dp, config.parallel.dp_shard) == (1, 4, True)
    assert config.model.name == "org/model" and config.pipeline.schedule == "gpipe"
    assert config.train.lr == 1e-3


def test_set_override_problems(tmp_path):
    path = write(tmp_path, "run.toml", "[train]\nsteps = 0\n")
    found = problems(path, ["parallel.dp=true", "parallel.tpp=2"])
    assert found == [
        f"{path}: parallel.dp: expected an integer, got True",
        f"{path}: parallel.tpp: unknown key (did you mean parallel.tp?)",
        f"{path}: train.steps: 0 is out of range (must be >= 1)",
    ]
    first, second = problems(path, ["nodot=1"])  # reported together with the file's problems
    assert first.startswith("--set nodot=1: expected table.key=value")
    assert second == f"{path}: train.steps: 0 is out of range (must be >= 1)"


def test_open_sections_keep_plugin_keys(tmp_path):
    path = write(tmp_path, "run.toml", "[model]\nhidden_size = 64\n[data]\nvocab_size = 300\n")
    config = load_config(path)
    assert config.model.options == {"hidden_size": 64}
    assert config.data.options == {"vocab_size": 300}
