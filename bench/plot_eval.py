"""Training and held-out loss curves of a run, from its metrics.jsonl, as a PNG.

    pip install -e ".[plot]"      # matplotlib
    python bench/plot_eval.py runs/smollm_cpu [--out docs/eval_curve.png] [--title TEXT]

Training loss per step (light) and its running mean over 5 steps, eval_loss where [eval] ran.
A resumed run appends to metrics.jsonl: the newest entry of each step wins.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        sys.exit(f"error: {path} not found (is {run_dir} a meshtrain run dir?)")
    steps: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            steps[entry["step"]] = entry
    return [steps[k] for k in sorted(steps)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="PNG path (default <run_dir>/eval_curve.png)")
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit('error: matplotlib is not installed (pip install -e ".[plot]")')
    metrics = read_metrics(args.run_dir)
    steps = [m["step"] for m in metrics]
    loss = [m["loss"] for m in metrics]
    mean = [
        sum(loss[max(0, i - 4) : i + 1]) / len(loss[max(0, i - 4) : i + 1])
        for i in range(len(loss))
    ]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=1, label="train loss")
    ax.plot(steps, mean, color="tab:blue", linewidth=2, label="train loss (mean of 5)")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", color="tab:orange", label="eval loss (held out)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(args.title or args.run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = args.out or args.run_dir / "eval_curve.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out} ({len(steps)} steps, {len(evals)} evaluations)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
