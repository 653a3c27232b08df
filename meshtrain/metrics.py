"""Step metrics: `<run.dir>/metrics.jsonl`, a progress line on rank 0, TensorBoard when asked.

MFU is model FLOPs per second over the machine's own matmul throughput, measured once per run
(`measure_peak_flops`), so it means the same on a laptop CPU and on a GPU.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from meshtrain.peaks import matmul_peaks

log = logging.getLogger("meshtrain")


def measure_peak_flops(
    device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 1.5
) -> float:
    """Dense matmul FLOP/s on `device`; on a CPU with every core (the machine's peak, which all
    local workers share). The best of several rounds at growing sizes (up to 2048 on a CPU),
    so that no real run measures faster than its peak (MFU stays under 100%); a dtype the
    hardware lacks (bf16 without AVX-512-bf16 / AMX) stops growing once one matmul is slow."""
    if device.type == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or 1)
        try:
            return _growing_matmul_flops(device, dtype, 2048, seconds)
        finally:
            torch.set_num_threads(threads)
    return _growing_matmul_flops(device, dtype, 8192, seconds)


def _growing_matmul_flops(
    device: torch.device, dtype: torch.dtype, largest: int, seconds: float
) -> float:
    best, n, deadline = 0.0, 256, time.perf_counter() + seconds
    while True:
        rate, one = _matmul_flops(device, dtype, n, seconds / 24)
        best = max(best, rate)
        # The next size: 8x the work per matmul, 4 of them (warm-up and 3 rounds).
        if n >= largest or time.perf_counter() + 32 * one > deadline:
            return best
        n *= 2


def _matmul_flops(
    device: torch.device, dtype: torch.dtype, n: int, seconds: float
) -> tuple[float, float]:
    """(best FLOP/s of 3 rounds of at least `seconds` each, seconds of one matmul)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm up
    best, one = 0.0, float("inf")
    for _ in range(3):
        count, start = 0, time.perf_counter()
        while count == 0 or time.perf_counter() - start < seconds:
            a @ b
            count += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        best, one = max(best, 2 * n**3 * count / elapsed), min(one, elapsed / count)
    return best, one


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
            else 0.0
        )
    return max(fp32, bf16) if precision == "bf16" else fp32
