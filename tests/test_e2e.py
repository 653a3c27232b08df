"""End-to-end: the `meshtrain` command as a user runs it, with the elastic launcher and torchrun.

meshtrain run configs/tiny_cpu.toml --set parallel.dp=2 --set parallel.pp=2 --set parallel.tp=2
torchrun --nproc-per-node 8 -m meshtrain run configs/tiny_cpu.toml --set ...
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.spawn import worker_pids

pytestmark = [pytest.mark.e2e, pytest.mark.dist]

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_cpu.toml")
LAYOUT_8 = ["--set", "parallel.dp=2", "--set", "parallel.pp=2", "--set", "parallel.tp=2"]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; the last entry of a step wins (a restarted run rewrites later steps)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m["loss"] for m in map(json.loads, lines)}


def meshtrain(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "meshtrain", *args],
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


@pytest.fixture(scope="module")
def launcher_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("launcher")
    # log.comms: the steps' collectives, which test_plan_sends_what_the_run_sends compares;
    # log.comm_time: their seconds by kind.
    result = meshtrain(
        "run",
        TINY,
        *LAYOUT_8,
        *("--set", f'run.dir="{run_dir}"', "--set", "log.comms=true"),
        *("--set", "log.comm_time=true"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_plan_sends_what_the_run_sends(launcher_run):
    """`meshtrain plan`'s simulated step (fake process group, fake tensors) makes the same
    collectives as the run's steps: calls and bytes per axis for each pp rank. From step 2: step 1
    also sends the pipeline's shape inference."""
    from meshtrain.config import load_config
    from meshtrain.job import resolve_job
    from meshtrain.precision import with_precision
    from meshtrain.simulate import simulate_job

    overrides = [item for item in LAYOUT_8 if item != "--set"]
    sims = simulate_job(with_precision(resolve_job(load_config(TINY, overrides)), "fp32"))
    lines = (launcher_run / "metrics.jsonl").read_text().splitlines()
    for step in map(json.loads, lines[1:3]):
        for axis in ("dp", "pp", "tp", "world"):
            simulated = [sim.traffic.get(axis) for sim in sims]
            assert step["comm_bytes"][axis] == [t.bytes if t else 0 for t in simulated], axis
            assert step["comm_calls"][axis] == [t.calls if t else 0 for t in simulated], axis
        assert step["comm_bytes"]["tp"][0] > 0 and step["comm_bytes"]["pp"][0] > 0


def test_comm_time_reports_each_kind_of_collective(launcher_run):
    """log.comm_time: every pp rank spent time in tp/dp all-reduces and pipeline sends and
    receives, and no more in its blocking collectives than the step took (point-to-point
    sends and receives and the tie's reduce are posted ahead and overlap everything else)."""
    blocking = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all")
    for line in (launcher_run / "metrics.jsonl").read_text().splitlines()[1:]:
        step = json.loads(line)
        seconds = step["comm_s"]
        for kind in ("all_reduce", "send", "recv"):
            assert all(s > 0 for s in seconds[kind]), (kind, seconds)
        for rank in range(2):
            spent = sum(seconds[kind][rank] for kind in blocking if kind in seconds)
            assert spent < step["step_time_s"], seconds


def test_cli_run_8_workers_trains_and_logs(launcher_run):
    metrics = [
        json.loads(line) for line in (launcher_run / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["step"] for m in metrics] == list(range(1, 11))
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.1
    for key in (
        "grad_norm",
        "lr",
        "tokens",
        "step_time_s",
        "tokens_per_s",
        "mfu",
        "peak_mem_total_gib",
    ):
        assert all(key in m for m in metrics)
    assert metrics[0]["tokens"] == 2 * 2 * 2 * 64  # dp * micro_batch_size * grad_acc * seq_len
    # Batches come from a background thread: after the first, a step waits < 1% of its time.
    waited = sum(m["data_wait_s"] for m in metrics[1:])
    assert waited < 0.01 * sum(m["step_time_s"] for m in metrics[1:]), waited
    assert sorted(p.name for p in (launcher_run / "logs").iterdir()) == [
        f"rank{r}.log" for r in range(8)
    ]
    assert (launcher_run / "tokenizer" / "tokenizer.json").is_file()


def test_torchrun_gives_the_launcher_losses(launcher_run, tmp_path):
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "8",
        "-m",
        "meshtrain",
        "run",
        TINY,
        *LAYOUT_8,
        "--set",
        f'run.dir="{tmp_path}"',
        "--set",
        "train.steps=3",  # losses before any decay step: the 10-step run's first 3
    ]
    result = subprocess.run(
        torchrun,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    first = {step: loss for step, loss in losses(launcher_run).items() if step <= 3}
    assert losses(tmp_path) == first


def test_torchrun_world_size_mismatch_is_a_user_error(tmp_path):
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}
    result = meshtrain("run", TINY, *LAYOUT_8, "--set", f'run.dir="{tmp_path}"', env=env)
    assert result.returncode == 2
    assert (
        "WORLD_SIZE=4" in result.stderr
        and "parallel.dp * parallel.pp * parallel.tp = 8" in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_killed_worker_ends_the_job_naming_its_rank(tmp_path):
    command = [
        sys.executable,
        "-m",
        "meshtrain",
        "run",
        TINY,
        "--set",
        "parallel.dp=2",
        "--set",
        "train.steps=100000",
        "--set",
        "train.micro_batch_size=1",
        "--set",
        f'run.dir="{tmp_path}"',
    ]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (
            (tmp_path / "metrics.jsonl").is_file()
            and len((tmp_path / "metrics.jsonl").read_text().splitlines()) >= 2
        ):
            time.sleep(0.5)
        workers = worker_pids(tmp_path)
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = job.communicate(timeout=60)
        assert time.monotonic() - killed_at < 60
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode not in (0, None)
    assert "rank 1 failed" in stderr, stderr[-2000:]
