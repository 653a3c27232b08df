"""The `meshtrain` command: exit codes, the `check` layout, `plugins`, user errors.

    python -m pytest -q tests/test_cli.py

A few cases run `python -m meshtrain` in a subprocess (the real exit status and streams); the bad
configs call `meshtrain.cli.main` in-process, whose return value is that exit status.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from meshtrain.cli import main, toml_value

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_cpu.toml"
SMOLLM = ROOT / "configs" / "smollm_cpu.toml"


def meshtrain(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "meshtrain", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **env},
    )


def rank_rows(stdout: str) -> list[list[str]]:
    """The rank table: rank, (dp, pp, tp), stage, layers, params, memory columns."""
    rows = re.findall(
        r"^\s*(\d+)\s+\((\d+), (\d+), (\d+)\)\s+(\S+)\s+(\S+)\s+([\d,]+)\s", stdout, re.M
    )
    return [list(row) for row in rows]


def test_check_tiny_prints_config_and_layout():
    result = meshtrain("check", str(TINY))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "[train]\nsteps = 10\n" in out and 'source = "offline"' in out
    assert "stage 0: embedding, layers 0-3, norm + head" in out
    assert rank_rows(out) == [["0", "0", "0", "0", "0", "0-3", "377,408"]]
    assert "error:" not in result.stderr and "Traceback" not in result.stderr


def test_check_smollm_prints_8_rank_layout():
    result = meshtrain("check", str(SMOLLM))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "8 ranks = dp 2 x pp 2 x tp 2" in out
    assert "stage 0: embedding, layers 0-2\nstage 1: layers 3-4, norm + head" in out
    rows = rank_rows(out)
    assert [row[:4] for row in rows] == [
        [str(r), str(r // 4), str(r // 2 % 2), str(r % 2)] for r in range(8)
    ]
    # stage 0: embedding + 3 layers, stage 1: 2 layers + norm + (tied) head; weights split over
    # tp = 2, then everything over dp = 2 (dp_shard).
    layer = 4 * 2048 * 2048 + 3 * 2048 * 8192
    stage0 = (49152 * 2048 + 3 * layer) // 2 + 3 * 2 * 2048
    stage1 = (49152 * 2048 + 2 * layer) // 2 + 2 * 2 * 2048 + 2048
    expected = {"0": ("0-2", stage0 // 2), "1": ("3-4", stage1 // 2)}
    for row in rows:
        layers, params = expected[row[4]]
        assert row[5] == layers and row[6] == f"{params:,}"


def test_check_set_override_changes_layout():
    code = main(
        [
            "check",
            str(TINY),
            "--set",
            "parallel.dp=2",
            "--set",
            "parallel.pp=2",
            "--set",
            "parallel.tp=2",
        ]
    )
    assert code == 0


def test_plugins_lists_builtins():
    result = meshtrain("plugins")
    assert result.returncode == 0, result.stderr
    for plugin in ("meshtrain_models", "meshtrain_schedules", "meshtrain_data"):
        assert f"{plugin}  (meshtrain " in result.stdout
    assert (
        "model family: gemma, gpt_neox, llama, mistral, mixtral, olmo2, phi3, qwen2, qwen3, "
        "qwen3_moe" in result.stdout
    )
    assert re.search(r"pipeline schedule: .*\b1f1b\b", result.stdout)
    assert re.search(r"pipeline schedule: .*\bgpipe\b", result.stdout)
    assert re.search(r"data source: .*\boffline\b", result.stdout)


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(text.replace("BASE", f"base = {json.dumps(str(TINY))}"))
    return path


BAD_CONFIGS = {
    "unknown key": (
        "BASE\n[train]\nstepz = 3\n",
        ["train.stepz: unknown key (did you mean train.steps?)"],
    ),
    "misspelt family": (
        'BASE\n[model]\nfamily = "lama"\n',
        ["model.family: unknown model family 'lama' (did you mean llama?)"],
    ),
    "tp vs heads": (
        "BASE\n[parallel]\ntp = 3\n",
        [
            "parallel.tp: 3 does not divide model.num_attention_heads (4)",
            "parallel.tp: 3 does not divide model.num_key_value_heads (2)",
        ],
    ),
    "wrong types": (
        "BASE\n[parallel]\ndp = true\n[train]\nsteps = 2.5\n",
        ["parallel.dp: expected an integer, got True", "train.steps: expected an integer, got 2.5"],
    ),
    "plugin key type": (
        "BASE\n[model]\nnum_hidden_layers = 2.5\n",
        ["model.num_hidden_layers: expected an integer, got 2.5"],
    ),
    "missing base": ('base = "nope.toml"\n', ["base: file not found", "nope.toml"]),
    "V schedule, too few layers": (
        'BASE\n[parallel]\npp = 4\n[pipeline]\nschedule = "zbv"\n[train]\ngrad_acc = 4\n',
        ["parallel.pp: 4 ranks x 2 stages per rank = 8 stages exceed the 4 layers"],
    ),
    "dualpipev, grad_acc too small": (
        'BASE\n[parallel]\npp = 2\n[pipeline]\nschedule = "dualpipev"\n',
        ["train.grad_acc: 2 micro-batches is fewer than the stages (2 x parallel.pp) (4)"],
    ),
    "zero bubble with FSDP resharding": (
        'BASE\n[parallel]\npp = 2\ndp = 2\ndp_shard = true\nreshard_after_forward = "always"\n'
        '[pipeline]\nschedule = "zbv"\n',
        ["parallel.reshard_after_forward: 'always' cannot be used with pipeline.schedule 'zbv'"],
    ),
    "zero bubble with gradients reduced per micro-batch": (
        'BASE\n[parallel]\npp = 2\ndp = 2\ndp_shard = true\ngrad_sync = "microbatch"\n'
        '[pipeline]\nschedule = "interleaved_zb"\n',
        ["parallel.grad_sync: 'microbatch' cannot be used with pipeline.schedule 'interleaved_zb'"],
    ),
    "unknown grad_sync": (
        'BASE\n[parallel]\ngrad_sync = "sometimes"\n',
        ["parallel.grad_sync"],
    ),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_configs_exit_2_with_one_line_per_problem(case, tmp_path, capsys):
    text, expected = BAD_CONFIGS[case]
    path = write_config(tmp_path, text)
    assert main(["check", str(path)]) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and lines and all(line.startswith(f"error: {path}: ") for line in lines)
    for fragment in expected:
        assert any(fragment in line for line in lines), (fragment, lines)
    assert "Traceback" not in err


def test_bad_config_subprocess_exit_2_no_traceback(tmp_path):
    path = write_config(tmp_path, '[parallel]\ntp = 3\n[model]\nfamily = "lama"\n')
    result = meshtrain("check", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: {path}: model.family: unknown model family 'lama' (did you mean llama?); "
        "available: gemma, gpt_neox, llama, mistral, mixtral, olmo2, phi3, qwen2, qwen3, qwen3_moe"
    ]
    debug = meshtrain("check", str(path), MESHTRAIN_DEBUG="1")
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_bad_arguments_exit_2():
    result = meshtrain("chek", str(TINY))
    assert result.returncode == 2 and "invalid choice" in result.stderr
    with pytest.raises(SystemExit) as info:
        main(["check"])
    assert info.value.code == 2


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert main(["run", str(tmp_path / "absent.toml")]) == 2
    assert "absent.toml" in capsys.readouterr().err


def test_toml_value_round_trips():
    import tomllib

    values = {"a": True, "b": 3, "c": 1e-5, "d": 'x "y"', "e": [1, "z"], "f": {"g": 2}}
    text = "\n".join(f"{k} = {toml_value(v)}" for k, v in values.items())
    assert tomllib.loads(text) == values
