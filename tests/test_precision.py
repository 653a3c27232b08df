"""train.precision = "auto" (meshtrain/precision.py) and the matmul peaks behind it and MFU.

No process group, no real measurement but one: the peaks come from the environment, as the
launcher hands them to its workers.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from meshtrain.config import load_config
from meshtrain.precision import PRECISION_ENV, choose, decide, resolve_precision

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.toml"
PEAKS = ("MESHTRAIN_PEAK_FLOPS", "MESHTRAIN_PEAK_FLOPS_BF16")


@pytest.mark.parametrize(
    ("fp32", "bf16", "want"),
    [
        (131e9, 47e9, "fp32"),  # an Intel Xeon without bf16 hardware: 0.36x
        (137e9, 0.9e9, "fp32"),  # an AMD EPYC with AVX2 only: emulated, 0.01x
        (100e9, 450e9, "bf16"),  # an AMD EPYC with AVX-512-bf16: 4.5x
        (100e9, 110e9, "fp32"),  # within the margin: not worth bf16's rounding
    ],
)
def test_auto_never_picks_the_slower_precision(monkeypatch, fp32, bf16, want):
    monkeypatch.setenv(PEAKS[0], str(fp32))
    monkeypatch.setenv(PEAKS[1], str(bf16))
    choice, why = choose(torch.device("cpu"))
    assert choice == want
    assert f"{bf16 / fp32:.2f}x fp32" in why


def test_launcher_decides_once_for_its_workers(monkeypatch, caplog):
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    monkeypatch.setenv(PEAKS[0], "100e9")
    monkeypatch.setenv(PEAKS[1], "450e9")
    with caplog.at_level(logging.INFO, logger="meshtrain"):
        assert decide(load_config(TINY), "cpu") == "bf16"
    assert "train.precision auto -> bf16: bf16 matmul 450.0 GFLOP/s = 4.50x" in caplog.text
    import os

    assert os.environ[PRECISION_ENV] == "bf16"


def test_explicit_bf16_where_slower_warns_and_stays(monkeypatch, caplog):
    monkeypatch.setenv(PEAKS[0], "131e9")
    monkeypatch.setenv(PEAKS[1], "47e9")
    config = load_config(TINY, ['train.precision="bf16"'])
    with caplog.at_level(logging.WARNING, logger="meshtrain"):
        assert decide(config, "cpu") == "bf16"
    (record,) = caplog.records
    assert "bf16 is slower than fp32 on this CPU" in record.getMessage()


def test_workers_take_the_launchers_choice(monkeypatch):
    """resolve_precision replaces "auto" in the job's config (the default) with the choice."""
    from meshtrain.job import resolve_job

    job = resolve_job(load_config(TINY))
    assert job.config.train.precision == "auto"  # the default
    monkeypatch.setenv(PRECISION_ENV, "bf16")
    resolved = resolve_precision(job, mesh=None)
    assert resolved.config.train.precision == "bf16"
    assert resolved.config.parallel == job.config.parallel


def test_the_peak_grows_past_a_small_matmul():
    """The fp32 peak is the best of growing sizes: at least what one 256 x 256 matmul gives."""
    from meshtrain.peaks import _matmul_flops, measure_peak_flops

    small, _ = _matmul_flops(torch.device("cpu"), torch.float32, 256, 0.02)
    assert (
        measure_peak_flops(torch.device("cpu"), seconds=0.2) >= 0.5 * small
    )  # a busy machine varies


def test_peaks_are_measured_once_per_machine(monkeypatch, tmp_path, caplog):
    """Without the environment the peaks come from the machine's cache entry; only a missing
    or unreadable entry is measured (and written)."""
    from meshtrain import peaks

    monkeypatch.setenv("MESHTRAIN_CACHE", str(tmp_path))
    measured = []

    def measure():
        measured.append(1)
        return 150e9, 1.5e9, 0.0

    monkeypatch.setattr(peaks, "measure_cpu", measure)
    caplog.set_level(logging.INFO, logger="meshtrain")
    for _ in range(2):
        for name in PEAKS:
            monkeypatch.delenv(name, raising=False)
        assert not peaks.known()
        assert peaks.matmul_peaks() == (150e9, 1.5e9)
        assert peaks.cached()
    assert len(measured) == 1
    assert "matmul peaks of this machine from" in caplog.text
    peaks.cache_path().write_text("{half a file")
    for name in PEAKS:
        monkeypatch.delenv(name, raising=False)
    assert not peaks.cached()
    assert peaks.matmul_peaks() == (150e9, 1.5e9)
    assert len(measured) == 2
    # torchrun's workers on one node measure side by side: nothing of theirs is cached
    peaks.cache_path().unlink()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for name in PEAKS:
        monkeypatch.delenv(name, raising=False)
    assert peaks.matmul_peaks() == (150e9, 1.5e9)
    assert not peaks.cache_path().exists()
    # nor is what was measured while other processes took the cores (it reads low)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr(peaks, "measure_cpu", lambda: (50e9, 1.5e9, 0.4))
    for name in PEAKS:
        monkeypatch.delenv(name, raising=False)
    assert peaks.matmul_peaks() == (50e9, 1.5e9)
    assert not peaks.cache_path().exists()
    assert "other processes used 40% of the CPUs: not cached" in caplog.text


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="Linux's /proc/stat")
def test_a_measurement_counts_what_other_processes_took(monkeypatch):
    """measure_cpu's third value: the share of the machine's CPU time others took while it ran
    (one process spinning: about 1/cores)."""
    from meshtrain import peaks

    monkeypatch.setattr(peaks, "measure_peak_flops", lambda *args: time.sleep(0.6) or 1e9)
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        share = peaks.measure_cpu()[2]
    finally:
        spin.kill()
        spin.wait()
    assert share > 0.5 / (os.cpu_count() or 1), share
