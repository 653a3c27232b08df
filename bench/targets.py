"""The benchmark's targets (issue #12), each a bound on one scenario, a ratio between scenarios
of the same `bench/run.py` run, or a command's wall time.

Used by `bench/run.py`; a target whose scenarios did not both run is reported as n/a.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BF16_LOSS_RTOL = 2e-2


@dataclass(frozen=True, kw_only=True)
class Target:
    text: str
    """What is compared, as printed."""
    subject: str
    baseline: str
    key: str
    """Summary field compared (subject / baseline), or "loss" for the bf16 loss difference."""
    bound: float
    at_least: bool
    """True: ratio >= bound is met; False: ratio <= bound is met."""


TARGETS = [
    Target(
        text="ref-8 (the reference run, fp32) total peak memory <= 16 GiB",
        subject="ref-8",
        baseline="",
        key="peak_mem_total_gib",
        bound=16.0,
        at_least=False,
    ),
    Target(
        text="ref-8 tokens/s >= 0.8 x ref-1",
        subject="ref-8",
        baseline="ref-1",
        key="tokens_per_s",
        bound=0.8,
        at_least=True,
    ),
    Target(
        text="ref-8-tcmalloc tokens/s >= 0.8 x ref-1-tcmalloc",
        subject="ref-8-tcmalloc",
        baseline="ref-1-tcmalloc",
        key="tokens_per_s",
        bound=0.8,
        at_least=True,
    ),
    Target(
        text="ref-tp2pp2 tokens/s >= 0.9 x ref-1",
        subject="ref-tp2pp2",
        baseline="ref-1",
        key="tokens_per_s",
        bound=0.9,
        at_least=True,
    ),
    Target(
        text="ref-tp2pp2-tcmalloc tokens/s >= 0.9 x ref-1-tcmalloc",
        subject="ref-tp2pp2-tcmalloc",
        baseline="ref-1-tcmalloc",
        key="tokens_per_s",
        bound=0.9,
        at_least=True,
    ),
    Target(
        text="small-8 CPU-s/token <= 1.3 x small-1",
        subject="small-8",
        baseline="small-1",
        key="cpu_s_per_token",
        bound=1.3,
        at_least=False,
    ),
    Target(
        text="ref-8's bf16 speed-up >= 0.8 x ref-1's (where bf16 is faster here)",
        subject="ref-8-bf16",
        baseline="ref-8",
        key="bf16_gain",
        bound=0.8,
        at_least=True,
    ),
    Target(
        text=f"ref-8-bf16 max rel. loss diff vs ref-8 <= {BF16_LOSS_RTOL:g}",
        subject="ref-8-bf16",
        baseline="ref-8",
        key="loss",
        bound=BF16_LOSS_RTOL,
        at_least=False,
    ),
    Target(
        text="highest MFU of any scenario <= 100%",
        subject="*",
        baseline="",
        key="mfu",
        bound=1.0,
        at_least=False,
    ),
    Target(
        text="tiny-8-startup command to first step <= 10 s",
        subject="tiny-8-startup",
        baseline="",
        key="first_step_s",
        bound=10.0,
        at_least=False,
    ),
    Target(
        text="meshtrain check configs/smollm_cpu.toml <= 3 s",
        subject="command",
        baseline="",
        key="check",
        bound=3.0,
        at_least=False,
    ),
    Target(
        text="meshtrain plugins <= 2 s",
        subject="command",
        baseline="",
        key="plugins",
        bound=2.0,
        at_least=False,
    ),
]


def evaluate(summaries: dict[str, dict[str, Any]], machine: dict[str, Any]) -> list[dict]:
    """Each target with its value and met / missed / n/a."""
    rows = []
    for target in TARGETS:
        value = _value(target, summaries, machine)
        if value is None:
            status = "n/a"
        else:
            met = value >= target.bound if target.at_least else value <= target.bound
            status = "met" if met else "missed"
        rows.append(
            {"target": target.text, "value": value, "bound": target.bound, "status": status}
        )
    return rows


def _value(target: Target, summaries: dict, machine: dict[str, Any]) -> float | None:
    if target.subject == "command":
        return machine.get("command_s", {}).get(target.key)
    if target.subject == "*":
        values = [s[target.key] for s in summaries.values() if s.get("ok") and target.key in s]
        return max(values, default=None)
    if target.key == "bf16_gain":
        return _bf16_gain(summaries)
    subject = summaries.get(target.subject, {})
    if not subject.get("ok"):
        return None
    if not target.baseline:
        return subject.get(target.key)
    baseline = summaries.get(target.baseline, {})
    if not baseline.get("ok"):
        return None
    if target.key == "loss":
        return max_relative_loss_diff(subject["losses"], baseline["losses"])
    return subject[target.key] / baseline[target.key]


def _bf16_gain(summaries: dict[str, dict[str, Any]]) -> float | None:
    """(ref-8-bf16 / ref-8 tokens/s) / (ref-1-bf16 / ref-1): how much of one process's bf16
    speed-up the 8 workers keep."""
    names = ("ref-8-bf16", "ref-8", "ref-1-bf16", "ref-1")
    if not all(summaries.get(n, {}).get("ok") for n in names):
        return None
    speed = [summaries[n]["tokens_per_s"] for n in names]
    return (speed[0] / speed[1]) / (speed[2] / speed[3])


def max_relative_loss_diff(losses: list[float], reference: list[float]) -> float | None:
    """max |a - b| / |b| over the steps both runs reached (same seed, same batches)."""
    pairs = list(zip(losses, reference, strict=False))
    if not pairs:
        return None
    return max(abs(a - b) / abs(b) for a, b in pairs)
