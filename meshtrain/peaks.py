"""This CPU's all-core fp32 and bf16 matmul FLOP/s: what `train.precision = "auto"` compares and
what MFU divides by, measured once per machine and kept in the cache.

    fp32, bf16 = matmul_peaks()     # $MESHTRAIN_PEAK_FLOPS(_BF16), else the cache, else measured

Measuring takes seconds and must not share the cores with anything (a busy core reads slower,
and MFU could then pass 100%), so the launcher measures before it starts any worker, and only
where the cache has no entry for this machine: host, CPU model and flags, cores and torch version.
A measurement during which other processes took more than BUSY of the CPUs is used for this run
but not cached. Delete the entry to measure again. Workers torchrun started side by side on one
node measure each and cache nothing (they share the cores). torch is imported only to measure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import resource
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from meshtrain.preflight import cache_dir, write_cache

log = logging.getLogger("meshtrain")

PEAK_ENV = "MESHTRAIN_PEAK_FLOPS"
"""The fp32 matmul peak, measured once by the launcher (or the bench) for every worker."""
PEAK_BF16_ENV = "MESHTRAIN_PEAK_FLOPS_BF16"
BUSY = 0.1
"""Peaks measured while other processes took more than this share of the CPUs are not cached."""


def matmul_peaks() -> tuple[float, float]:
    """(fp32, bf16) FLOP/s from the environment, else this machine's cache entry, else measured
    now and cached; the environment then holds them for the workers this process starts."""
    if not known():
        fp32, bf16 = _read(cache_path())
        if fp32 and bf16:
            log.info("matmul peaks of this machine from %s", cache_path())
        else:
            fp32, bf16, others = measure_cpu()
            if others > BUSY:
                log.warning(
                    "matmul peaks measured while other processes used %.0f%% of the CPUs: "
                    "not cached (MFU may read high); measured again by the next run",
                    100 * others,
                )
            elif int(os.environ.get("LOCAL_WORLD_SIZE", "1")) == 1:  # not measured side by side
                _write(cache_path(), {"fp32": fp32, "bf16": bf16})
        os.environ[PEAK_ENV], os.environ[PEAK_BF16_ENV] = str(fp32), str(bf16)
    return float(os.environ[PEAK_ENV]), float(os.environ[PEAK_BF16_ENV])


def known() -> bool:
    """Whether the environment already holds both peaks."""
    return bool(os.environ.get(PEAK_ENV) and os.environ.get(PEAK_BF16_ENV))


def cached() -> bool:
    """Whether `matmul_peaks` would measure nothing (so others may use the cores meanwhile)."""
    return known() or all(_read(cache_path()))


def cache_path() -> Path:
    """This machine's cache entry."""
    try:  # the model and flags of the first CPU; not its MHz, which moves with the load
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
        cpu = "\n".join(line for line in first if line.startswith(("model name", "flags")))
    except OSError:
        cpu = platform.processor()
    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = ""
    key = "\n".join([platform.node(), cpu, str(os.cpu_count()), torch_version])
    return cache_dir() / "peaks" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


def measure_cpu(seconds: float = 1.5) -> tuple[float, float, float]:
    """(fp32, bf16, the share of the machine's CPU time other processes took meanwhile)."""
    import torch

    cpu = torch.device("cpu")
    busy, own, start = _machine_busy_s(), _own_cpu_s(), time.perf_counter()
    fp32 = measure_peak_flops(cpu, torch.float32, seconds)
    bf16 = measure_peak_flops(cpu, torch.bfloat16, seconds)
    others = (_machine_busy_s() - busy) - (_own_cpu_s() - own)
    return fp32, bf16, others / ((time.perf_counter() - start) * (os.cpu_count() or 1))


def _machine_busy_s() -> float:
    """CPU seconds every core of the machine has been busy (or stolen by its host) since boot;
    0 where /proc/stat is missing (then nothing counts as busy)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure_peak_flops(device: Any, dtype: Any = None, seconds: float = 1.5) -> float:
    """Dense matmul FLOP/s on `device`; on a CPU with every core (the machine's peak, which all
    local workers share). The best of several rounds at growing sizes (up to 2048 on a CPU),
    so that no real run measures faster than its peak (MFU stays under 100%); a dtype the
    hardware lacks (bf16 without AVX-512-bf16 / AMX) stops growing once one matmul is slow."""
    import torch

    dtype = dtype or torch.float32
    if device.type == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or 1)
        try:
            return _growing_matmul_flops(device, dtype, 2048, seconds)
        finally:
            torch.set_num_threads(threads)
    return _growing_matmul_flops(device, dtype, 8192, seconds)


def _growing_matmul_flops(device: Any, dtype: Any, largest: int, seconds: float) -> float:
    best, n, deadline = 0.0, 256, time.perf_counter() + seconds
    while True:
        rate, one = _matmul_flops(device, dtype, n, seconds / 24)
        best = max(best, rate)
        # The next size: 8x the work per matmul, 4 of them (warm-up and 3 rounds).
        if n >= largest or time.perf_counter() + 32 * one > deadline:
            return best
        n *= 2


def _matmul_flops(device: Any, dtype: Any, n: int, seconds: float) -> tuple[float, float]:
    """(best FLOP/s of 3 rounds of at least `seconds` each, seconds of one matmul)."""
    import torch

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


def _read(path: Path) -> tuple[float, float]:
    try:
        peaks = json.loads(path.read_text())
        return float(peaks["fp32"]), float(peaks["bf16"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0, 0.0


def _write(path: Path, peaks: dict[str, float]) -> None:
    try:
        write_cache(path, peaks)
    except OSError as err:  # a read-only cache costs a measurement per run, nothing else
        log.warning("could not cache the matmul peaks in %s: %s", path, err)
