"""metrics.jsonl, the progress line off a terminal, TensorBoard or a clear message without it."""

from __future__ import annotations

import builtins
import json
import logging

from meshtrain.metrics import MetricsLog


def step_metrics(step: int) -> dict:
    return {
        "step": step,
        "loss": 2.0 / step,
        "grad_norm": 1.0,
        "lr": 1e-3,
        "tokens": 256,
        "step_time_s": 0.5,
        "tokens_per_s": 512.0,
        "mfu": 0.1,
        "peak_mem_total_gib": 1.5,
        "peak_mem_max_rank_gib": 0.5,
        "cpu_s": 1.0,
        "steps_this_run": step,
    }


def test_jsonl_has_every_step_and_plain_lines_every_n(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="meshtrain")
    log = MetricsLog(tmp_path, total_steps=4, every=2, tensorboard=False)
    for step in range(1, 5):
        log.write(step_metrics(step))
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert lines[2]["loss"] == 2.0 / 3  # full float precision
    shown = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [s.split()[1] for s in shown] == ["2/4", "4/4"]
    assert "tok/s" in shown[0] and "eta" in shown[0]


def test_tensorboard_missing_is_a_clear_warning(tmp_path, caplog, monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    log = MetricsLog(tmp_path, total_steps=1, every=1, tensorboard=True)
    log.write(step_metrics(1))
    log.close()
    assert any("pip install tensorboard" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "metrics.jsonl").is_file()


def test_tensorboard_writes_event_files_when_installed(tmp_path):
    import pytest

    pytest.importorskip("tensorboard")
    log = MetricsLog(tmp_path, total_steps=1, every=1, tensorboard=True)
    log.write(step_metrics(1))
    log.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
