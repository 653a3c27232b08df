"""Step metrics: `<run.dir>/metrics.jsonl`, a progress line on rank 0, TensorBoard when asked.

MFU is model FLOPs per second over the machine's own matmul throughput (meshtrain.peaks: a CPU's
measured once per machine, a known GPU's published bf16 peak), so it means the same on a laptop
CPU and on a GPU.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from meshtrain.peaks import matmul_peaks, measure_peak_flops

log = logging.getLogger("meshtrain")


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak memory (GiB): allocated on the GPU on CUDA, else the peak resident
    memory the OS had to give it."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


GPU_BF16_PEAK = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "B200": 2250e12,
}
"""Published dense bf16 tensor-core FLOP/s (SXM parts), for MFU on GPUs."""


class MetricsLog:
    """Writes one JSON object per step; rank 0 only."""

    def __init__(self, run_dir: Path, total_steps: int, every: int, tensorboard: bool):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        self.total, self.every = total_steps, every
        self.tty = sys.stderr.isatty()
        self.started = time.perf_counter()
        self.writer = _tensorboard_writer(run_dir) if tensorboard else None

    def write(self, metrics: dict[str, Any]) -> None:
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        step = metrics["step"]
        if self.writer is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, int | float):
                    self.writer.add_scalar(key, value, step)
        if step % self.every == 0 or step == self.total or "eval_loss" in metrics:
            self._show(metrics)

    def _show(self, m: dict[str, Any]) -> None:
        step = m["step"]
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(1, m["steps_this_run"]) * (self.total - step)
        text = (
            f"step {step}/{self.total} loss {m['loss']:.4f} grad_norm {m['grad_norm']:.3f} "
            f"lr {m['lr']:.2e} {m['tokens_per_s']:.0f} tok/s {m['step_time_s']:.2f} s/step "
            f"mfu {m['mfu']:.1%} mem {m['peak_mem_total_gib']:.1f} GiB eta {eta:.0f}s"
        )
        if "eval_loss" in m:
            text += f" | eval_loss {m['eval_loss']:.4f} eval_ppl {m['eval_ppl']:.1f}"
        if self.tty:
            done = int(20 * step / self.total)
            bar = "#" * done + "." * (20 - done)
            end = "\n" if step == self.total else ""
            sys.stderr.write(f"\r[{bar}] {text}\033[K{end}")
            sys.stderr.flush()
        else:
            log.info(text)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def _tensorboard_writer(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning(
            "log.tensorboard = true but the tensorboard package is not installed "
            "(pip install tensorboard); writing metrics.jsonl only"
        )
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def peak_flops(mesh: Any, precision: str = "fp32") -> float:
    """The machine's matmul FLOP/s for MFU: on a known GPU in bf16 its published peak; on a CPU
    all its cores' (meshtrain.peaks, measured once per machine); else measured here per device.
    A bf16 run is held to the faster of the two peaks: what it leaves in fp32 (norms, softmax)
    cannot beat the machine's best."""
    if mesh.device.type == "cuda" and precision == "bf16":
        name = torch.cuda.get_device_name(mesh.device)
        known = [peak for key, peak in GPU_BF16_PEAK.items() if key in name.split()]
        if known:
            return known[0] * mesh.world
    if mesh.device.type == "cpu":
        fp32, bf16 = matmul_peaks()
    else:
        fp32 = measure_peak_flops(mesh.device) * mesh.world
        bf16 = (
            measure_peak_flops(mesh.device, torch.bfloat16) * mesh.world
            if precision == "bf16"
            else 0
        )
    return max(fp32, bf16) if precision == "bf16" else fp32
