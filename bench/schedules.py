"""Every installed pipeline schedule side by side: step time, bubble and memory per pp rank.

    python bench/schedules.py                 # bench-small at pp 2 and 4, 6 steps each
    python bench/schedules.py --steps 10 --pp 2

Each run is `meshtrain run` on bench-small (the reference vocabulary on a 4-layer body; see
bench/scenarios.py) with synthetic tokens, dp = tp = 1, 8 micro-batches of 2 sequences a step.
The bubble of a pp rank is the share of the step it spent outside its stages' forward and
backward passes (meshtrain's `pp_busy_s`, timed around the schedule's F, B, I and W actions):
waiting for a neighbour, or for the loss. Layouts a schedule refuses (too few layers for its
stages, too few micro-batches) are listed with the reason. Medians over the steps after the first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from runner import machine_line, measure_machine, run_scenario
from scenarios import REF, SMALL_MODEL, Scenario

from meshtrain.config import load_config
from meshtrain.errors import UserError
from meshtrain.job import resolve_job

BATCH = ["train.micro_batch_size=2", "train.grad_acc=8", "parallel.dp=1", "parallel.tp=1"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--out", type=Path, default=None, help="keep runs and JSON here")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="meshtrain-schedules-"))
    out.mkdir(parents=True, exist_ok=True)
    machine = measure_machine(seconds=2.0)
    print(f"# {machine_line(machine)} (matmul, all cores)")
    print(
        f"{'schedule':<17} {'pp':>2} {'s/step':>7} {'tok/s':>7}  {'bubble per pp rank':<26} "
        "peak GiB per pp rank"
    )
    rows = []
    for pp in args.pp:
        for name in schedule_names():
            overrides = [*SMALL_MODEL, *BATCH, f"parallel.pp={pp}", f'pipeline.schedule="{name}"']
            problem = refusal(overrides)
            if problem:
                print(f"{name:<17} {pp:>2}  skipped: {problem}")
                continue
            scenario = Scenario(name=f"{name}-pp{pp}", config=REF, overrides=overrides, workers=pp)
            result = run_scenario(scenario, machine, out / scenario.name, args.steps, quick=False)
            rows.append(report(name, pp, result))
    (out / "schedules.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    print(f"# runs and JSON in {out}")
    return 0 if all(row["ok"] for row in rows) else 1


def schedule_names() -> list[str]:
    from meshtrain.plugins import Plugins

    return list(Plugins().catalogs["pipeline_schedules"])


def refusal(overrides: list[str]) -> str:
    """The first config problem of this layout, or '' when meshtrain would run it."""
    try:
        resolve_job(load_config(REF, [*overrides, 'data.source="synthetic"']))
    except UserError as err:
        return err.problems[0].split(": ", 1)[-1]
    return ""


def report(name: str, pp: int, result: dict) -> dict:
    steps = result["steps"][1:]
    if result["exit_code"] != 0 or not steps:
        print(f"{name:<17} {pp:>2}  FAILED: {' | '.join(result.get('log_tail', [])[-3:])}")
        return {"schedule": name, "pp": pp, "ok": False}
    step_s = statistics.median(m["step_time_s"] for m in steps)
    busy = [statistics.median(m["pp_busy_s"][r] for m in steps) for r in range(pp)]
    bubble = [max(0.0, 1 - b / step_s) for b in busy]
    memory = [max(m["pp_peak_mem_gib"][r] for m in steps) for r in range(pp)]
    tokens = statistics.median(m["tokens_per_s"] for m in steps)
    print(
        f"{name:<17} {pp:>2} {step_s:>7.2f} {tokens:>7.0f}  "
        f"{' '.join(f'{b:4.0%}' for b in bubble):<26} {' '.join(f'{m:.2f}' for m in memory)}"
    )
    return {
        "schedule": name,
        "pp": pp,
        "ok": True,
        "step_s": step_s,
        "tokens_per_s": tokens,
        "bubble": bubble,
        "peak_mem_gib": memory,
    }


if __name__ == "__main__":
    sys.exit(main())
