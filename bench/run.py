"""Throughput, CPU time, memory, MFU and startup of meshtrain layouts on this machine.

    python bench/run.py                        # every scenario (about 80 minutes on 2 cores)
    python bench/run.py --scenarios small-8,small-1 --steps 10
    python bench/run.py --quick --scenarios small-8,small-1   # smoke test: tiny model
    python bench/run.py --scenarios moe-ep1,moe-ep2         # a mixture of experts, ep 1 vs 2

Each scenario (see bench/scenarios.py) is one `meshtrain run` subprocess on synthetic tokens.
The machine's all-core matmul peak is measured first, for fp32 and bf16, and handed to each run
in $MESHTRAIN_PEAK_FLOPS(_BF16), so a run's `mfu` is against the machine's best peak. Step 1
(shape inference, warm-up) is left out; the table shows medians over the other steps, memory is
the peak. Prints one table and the targets, writes everything (per-step metrics too) as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from fresh_memory import measure as measure_memory
from runner import (
    machine_line,
    measure_machine,
    report_failure,
    run_scenario,
    skip_reason,
    summarize,
    time_command,
)
from scenarios import COMMANDS, ROOT, SCENARIOS, steps_for
from targets import evaluate

from meshtrain.peaks import BUSY

COLUMNS = [
    ("scenario", 14),
    ("workers", 7),
    ("prec", 5),
    ("tok/s", 9),
    ("s/step", 8),
    ("cpu-s/step", 10),
    ("cpu-ms/tok", 10),
    ("mem/rank", 9),
    ("mem total", 9),
    ("MFU", 6),
    ("1st step s", 10),
    ("a2a s/step", 10),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated names (default all: {','.join(SCENARIOS)})",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps per scenario, >= 2 (default: 20 small, 5 ref, 2 startup)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "out" / "results.json",
        help="the JSON results file, or a folder to write results.json in",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny model, 3 steps per scenario: a smoke test of this script",
    )
    args = parser.parse_args(argv)
    args.names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in args.names if n not in SCENARIOS]
    if unknown:
        parser.error(
            f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}"
        )
    if args.out.is_dir():  # checked now: not after the whole run
        args.out = args.out / "results.json"
    if args.steps is not None and args.steps < 2:
        parser.error("--steps must be >= 2 (step 1 is left out of the medians)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = measure_machine(seconds=0.3 if args.quick else 1.5)
    _say(
        f"{machine_line(machine)}; "
        f"malloc {machine['tcmalloc'] or 'system (glibc): no tcmalloc installed'}"
    )
    if machine["others_share"] > BUSY:
        _say(
            f"warning: other processes took {machine['others_share']:.0%} of the CPUs while the "
            "peaks were measured: they read low, and MFU high"
        )
    machine["memory"] = memory = measure_memory()
    reporting = ", ".join(f"{k} {v}" for k, v in memory["page_reporting"].items()) or "none"
    _say(
        f"fresh memory {memory['fresh_gib_s']:.1f} GiB/s, memory a process holds "
        f"{memory['warm_gib_s']:.1f} (bench/fresh_memory.py); free page reporting: {reporting}"
    )
    summaries, runs = {}, {}
    commands = {name: time_command(command) for name, command in COMMANDS.items()}
    _say("wall s, best of 3: " + ", ".join(f"{n} {s:.2f}" for n, s in commands.items()))
    machine["command_s"] = commands
    with tempfile.TemporaryDirectory(prefix="meshtrain-bench-") as tmp:
        for name in args.names:
            scenario = SCENARIOS[name]
            reason = skip_reason(scenario, machine)
            if reason:
                _say(f"skipping {name}: {reason}")
                summaries[name] = {
                    "ok": False,
                    "skipped": reason,
                    "workers": scenario.workers,
                    "precision": scenario.precision,
                    "first_step_s": None,
                }
                continue
            steps = steps_for(scenario, args.steps, args.quick)
            _say(f"running {name} (workers={scenario.workers}, steps={steps}) ...")
            runs[name] = run_scenario(scenario, machine, Path(tmp) / name, steps, args.quick)
            summaries[name] = summarize(scenario, runs[name])
            if not summaries[name]["ok"]:
                report_failure(name, runs[name])
    targets = evaluate(summaries, machine)
    print_table(summaries)
    print_breakdown(summaries)
    print_targets(targets)
    write_json(args, machine, summaries, runs, targets)
    return 0 if all(s["ok"] for s in summaries.values()) else 1


def print_table(summaries: dict[str, dict[str, Any]]) -> None:
    # The scenario column as wide as the longest name in this run.
    columns = [("scenario", max(len("scenario"), *map(len, summaries))), *COLUMNS[1:]]
    print()
    print("  ".join(f"{title:>{width}}" for title, width in columns))
    for name, s in summaries.items():
        cells = [name, s["workers"], s["precision"]]
        if "tokens_per_s" in s:
            cells += [
                f"{s['tokens_per_s']:.1f}",
                f"{s['s_per_step']:.3f}",
                f"{s['cpu_s_per_step']:.2f}",
                f"{1e3 * s['cpu_s_per_token']:.3f}",
                f"{s['peak_mem_max_rank_gib']:.2f}",
                f"{s['peak_mem_total_gib']:.2f}",
                f"{s['mfu']:.1%}",
            ]
        else:
            cells += ["skipped" if "skipped" in s else "failed"] + ["-"] * 6
        first, a2a = s["first_step_s"], s.get("all_to_all_s_per_step")
        cells.append("-" if first is None else f"{first:.1f}")
        cells.append("-" if a2a is None else f"{a2a:.3f}")
        print(
            "  ".join(f"{cell!s:>{width}}" for cell, (_, width) in zip(cells, columns, strict=True))
        )
    print(
        "(medians over steps 2..N; tok/s and s/step are global; cpu summed over workers; "
        "mem in GiB, peak RSS; MFU vs this machine's measured peak for the precision;\n"
        " a2a: seconds per step each rank spends in the MoE all-to-alls, forward and backward)"
    )


def print_breakdown(summaries: dict[str, dict[str, Any]]) -> None:
    """Seconds of a step per rank (runner.breakdown): compute, the collectives inside the
    stages, the rest of the step, and the other collectives' time in flight."""
    rows = {name: s["breakdown_s"] for name, s in summaries.items() if "breakdown_s" in s}
    if not rows:
        return
    titles = list(dict.fromkeys(k for parts in rows.values() for k in parts))
    print("\nwhere a step goes, seconds per rank (mean over pp ranks): compute and the collectives")
    print("inside the stages' forward/backward (gloo: time in or waiting at them), the rest of")
    print("the step outside the stages; 'in flight' overlaps the rest and is not part of the sum:")
    print(f"{'scenario':>14}  " + "  ".join(f"{t:>18}" for t in titles))
    for name, parts in rows.items():
        cells = [f"{parts.get(t, 0.0):.3f}" for t in titles]
        print(f"{name:>14}  " + "  ".join(f"{c:>18}" for c in cells))


def print_targets(targets: list[dict[str, Any]]) -> None:
    print("\ntargets:")
    for t in targets:
        value = "-" if t["value"] is None else f"{t['value']:.4g}"
        print(f"  [{t['status']:>6}] {t['target']}: {value}")


def write_json(
    args: argparse.Namespace,
    machine: dict[str, Any],
    summaries: dict,
    runs: dict,
    targets: list[dict[str, Any]],
) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "machine": machine,
        "quick": args.quick,
        "argv": sys.argv,
        "scenarios": {n: {"summary": summaries[n], "run": runs.get(n)} for n in summaries},
        "targets": targets,
    }
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    _say(f"wrote {args.out}")


def _say(text: str) -> None:
    sys.stderr.write(f"bench: {text}\n")
    sys.stderr.flush()


if __name__ == "__main__":
    raise SystemExit(main())
