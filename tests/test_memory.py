"""Slow tier (`make memory`, not in CI): `meshtrain check`'s memory estimate against a real run.

configs/qwen3_cpu.toml (Qwen3-0.6B cut to 4 layers, dp2 pp2 tp2, FSDP2) is trained for 2 steps by
`meshtrain run` on 8 workers (about 3 minutes on 2 cores); the total of the workers' peak resident
memory must be within 15% of what `build_layout` estimates, and so must each pp rank's peak.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from meshtrain.config import load_config
from meshtrain.job import resolve_job
from meshtrain.layout import build_layout

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[1]
QWEN3 = ROOT / "configs" / "qwen3_cpu.toml"
GIB = 2**30


def test_check_estimates_the_measured_peak_of_qwen3_within_15_percent(tmp_path):
    overrides = ["train.steps=2", f'run.dir="{tmp_path}"', 'checkpoint.resume="never"']
    rows = build_layout(resolve_job(load_config(QWEN3, overrides)))
    command = [sys.executable, "-m", "meshtrain", "run", str(QWEN3)]
    for item in overrides:
        command += ["--set", item]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    estimate = sum(row.memory.total for row in rows) / GIB
    assert abs(last["peak_mem_total_gib"] - estimate) <= 0.15 * last["peak_mem_total_gib"], (
        last["peak_mem_total_gib"],
        estimate,
    )
    for pp_rank, measured in enumerate(last["pp_peak_mem_gib"]):
        guess = next(row.memory.total for row in rows if row.pp == pp_rank) / GIB
        assert abs(measured - guess) <= 0.15 * measured, (pp_rank, measured, guess)
