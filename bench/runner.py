"""Run one benchmark scenario as a subprocess, summarise its `metrics.jsonl`; measure the machine.

Used by `bench/run.py`; not meant to be run on its own.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from scenarios import ROOT, Scenario, build_command

from meshtrain.malloc import find_tcmalloc
from meshtrain.peaks import PEAK_BF16_ENV, PEAK_ENV, measure_cpu

POLL_S = 0.05


def measure_machine(seconds: float) -> dict[str, Any]:
    """CPU model, cores, torch version, the tcmalloc run.malloc = "auto" takes (None: glibc's),
    the all-core matmul peak for fp32 and bf16, and the share of the CPUs other processes took
    while it was measured (over BUSY, the peak reads low and MFU high)."""
    fp32, bf16, others = measure_cpu(seconds)
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count() or 1,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "tcmalloc": find_tcmalloc(),
        "peak_gflops_fp32": fp32 / 1e9,
        "peak_gflops_bf16": bf16 / 1e9,
        "others_share": others,
    }


def machine_line(machine: dict[str, Any]) -> str:
    """What every benchmark prints first: the CPU, its cores, torch and the measured peaks."""
    return (
        f"{machine['cpu_model']}, {machine['cores']} cores, torch {machine['torch']}: peak "
        f"{machine['peak_gflops_fp32']:.1f} GFLOP/s fp32, {machine['peak_gflops_bf16']:.1f} bf16"
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def scenario_env(scenario: Scenario, machine: dict[str, Any]) -> dict[str, str]:
    """The parent's environment, with the machine's peaks for the run's own `mfu`."""
    env = dict(os.environ)
    env[PEAK_ENV] = str(machine["peak_gflops_fp32"] * 1e9)
    env[PEAK_BF16_ENV] = str(machine["peak_gflops_bf16"] * 1e9)
    if scenario.workers == 1:
        env["OMP_NUM_THREADS"] = str(machine["cores"])  # one process uses every core: fair baseline
    else:
        # The local launcher gives each worker 1 thread unless this is already set; a value
        # inherited from the shell would oversubscribe the cores.
        env.pop("OMP_NUM_THREADS", None)
    return env


def run_scenario(
    scenario: Scenario, machine: dict[str, Any], run_dir: Path, steps: int, quick: bool
) -> dict[str, Any]:
    """Run `scenario`; returns its per-step metrics, wall times and exit status."""
    command = build_command(scenario, run_dir, steps, quick)
    metrics_path, log_path = run_dir / "metrics.jsonl", run_dir.parent / f"{run_dir.name}.log"
    with open(log_path, "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=scenario_env(scenario, machine),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        first_step_s = _wait_first_step(proc, metrics_path, start)
        code = proc.wait()
        wall_s = time.perf_counter() - start
    result: dict[str, Any] = {
        "command": command,
        "exit_code": code,
        "wall_s": wall_s,
        "first_step_s": first_step_s,
        "steps": _read_metrics(metrics_path),
    }
    if code != 0:
        result["log_tail"] = log_path.read_text().splitlines()[-25:]
    return result


def _wait_first_step(proc: subprocess.Popen, metrics_path: Path, start: float) -> float | None:
    """Seconds from Popen until rank 0 wrote the first metrics line; None if it never did."""
    while proc.poll() is None:
        if metrics_path.exists() and metrics_path.stat().st_size > 0:
            return time.perf_counter() - start
        time.sleep(POLL_S)
    return None


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(scenario: Scenario, result: dict[str, Any]) -> dict[str, Any]:
    """Medians over the steps after the first (shape inference, warm-up); memory is the peak."""
    steps = result["steps"]
    timed = steps[1:] if len(steps) > 1 else steps
    summary: dict[str, Any] = {
        "workers": scenario.workers,
        "precision": scenario.precision,
        "steps_run": len(steps),
        "steps_timed": len(timed),
        "first_step_s": result["first_step_s"],
        "wall_s": result["wall_s"],
        "ok": result["exit_code"] == 0 and bool(steps),
    }
    if not timed:
        return summary

    def median(key: str) -> float:
        return statistics.median(float(m[key]) for m in timed)

    summary.update(
        {
            "tokens_per_step": int(timed[-1]["tokens"]),
            "tokens_per_s": median("tokens_per_s"),
            "s_per_step": median("step_time_s"),
            "cpu_s_per_step": median("cpu_s"),
            "cpu_s_per_token": statistics.median(m["cpu_s"] / m["tokens"] for m in timed),
            "mfu": median("mfu"),
            "peak_mem_max_rank_gib": max(m["peak_mem_max_rank_gib"] for m in steps),
            "peak_mem_total_gib": max(m["peak_mem_total_gib"] for m in steps),
            "losses": [m["loss"] for m in steps],
        }
    )
    if "all_to_all_s" in timed[-1]:  # a mixture of experts
        summary["all_to_all_s_per_step"] = median("all_to_all_s")
        summary["expert_load"] = median("expert_tokens_max") / median("expert_tokens_mean")
    if "comm_s" in timed[-1]:
        summary["breakdown_s"] = breakdown(timed)
    return summary


IN_STAGES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all")
"""Collectives made inside a stage's forward and backward (tp, FSDP2, experts): blocking, so
their time is part of the stages' busy time. Point-to-point sends and receives are posted ahead
and overlap compute: their time in flight is not wall time of the step."""


def breakdown(timed: list[dict[str, Any]]) -> dict[str, float]:
    """Where a rank's step goes, the mean over pp ranks and the median over steps: compute (its
    stages' forward and backward without the collectives inside them), each of those
    collectives (gloo: time in or waiting at it), and outside the stages (pipeline bubble and
    waiting for neighbours, gradient finishing, optimizer, Python). `in flight:` entries are
    the other collectives' time in flight, which overlaps the rest (not summed)."""
    kinds = sorted({kind for m in timed for kind in m["comm_s"]})

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    def median(value: Any) -> float:
        return statistics.median(value(m) for m in timed)

    busy = median(lambda m: mean(m["pp_busy_s"]))
    step = median(lambda m: float(m["step_time_s"]))
    parts = {kind: median(lambda m, k=kind: mean(m["comm_s"].get(k, [0.0]))) for kind in kinds}
    inside = {k: v for k, v in parts.items() if k in IN_STAGES}
    return {
        "compute": busy - sum(inside.values()),
        **inside,
        "outside stages": step - busy,
        **{f"in flight: {k}": v for k, v in parts.items() if k not in IN_STAGES},
    }


def time_command(args: list[str], tries: int = 3) -> float:
    """Best wall time of `python -m meshtrain ARGS` over `tries` runs (a fresh process each)."""
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "meshtrain", *args],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=True,
        )
        best = min(best, time.perf_counter() - start)
    return best


def skip_reason(scenario: Scenario, machine: dict[str, Any]) -> str | None:
    """bf16 scenarios only where bf16 matmuls are faster than fp32 (the targets about bf16
    speed apply only there; on a CPU without bf16 hardware they would run for hours); tcmalloc
    scenarios only where it is installed."""
    if scenario.malloc == "tcmalloc" and not machine["tcmalloc"]:
        return "no tcmalloc on this machine (apt install libtcmalloc-minimal4)"
    if scenario.precision == "bf16" and machine["peak_gflops_bf16"] <= machine["peak_gflops_fp32"]:
        return (
            f"bf16 matmul {machine['peak_gflops_bf16']:.1f} GFLOP/s is not faster than fp32 "
            f"{machine['peak_gflops_fp32']:.1f} here"
        )
    return None


def report_failure(name: str, result: dict[str, Any]) -> None:
    """Name the failed scenario and show the end of its output on stderr."""
    sys.stderr.write(f"bench: {name} exited with {result['exit_code']}; last lines:\n")
    for line in result.get("log_tail", []):
        sys.stderr.write(f"  {line}\n")
