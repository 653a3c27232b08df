"""This CPU's all-core fp32 and bf16 matmul FLOP/s: what `train.precision = "auto"` compares and
what MFU divides by, measured once per machine and kept in the cache.

    fp32, bf16 = matmul_peaks()     # $MESHTRAIN_PEAK_FLOPS(_BF16), else the cache, else measured

Measuring takes seconds and must not share the cores with anything (a busy core reads slower,
and MFU could then pass 100%), so the launcher measures before it starts any worker, and only
where the cache has no entry for this machine: host, CPU model and flags, cores and torch version.
Delete the entry to measure again. Workers torchrun started side by side on one node measure each
and cache nothing (they share the cores). torch is imported only to measure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from meshtrain.preflight import cache_dir

log = logging.getLogger("meshtrain")

PEAK_ENV = "MESHTRAIN_PEAK_FLOPS"
"""The fp32 matmul peak, measured once by the launcher (or the bench) for every worker."""
PEAK_BF16_ENV = "MESHTRAIN_PEAK_FLOPS_BF16"


def matmul_peaks() -> tuple[float, float]:
    """(fp32, bf16) FLOP/s from the environment, else this machine's cache entry, else measured
    now and cached; the environment then holds them for the workers this process starts."""
    if not known():
        fp32, bf16 = _read(cache_path())
        if fp32 and bf16:
            log.info("matmul peaks of this machine from %s", cache_path())
        else:
            fp32, bf16 = _measure()
            if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) == 1:  # not measured side by side
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
    try:
        cpu = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        cpu = platform.processor()
    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = ""
    key = "\n".join([platform.node(), cpu, str(os.cpu_count()), torch_version])
    return cache_dir() / "peaks" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


def _measure() -> tuple[float, float]:
    import torch

    from meshtrain.metrics import measure_peak_flops

    cpu = torch.device("cpu")
    return measure_peak_flops(cpu, torch.float32), measure_peak_flops(cpu, torch.bfloat16)


def _read(path: Path) -> tuple[float, float]:
    try:
        peaks = json.loads(path.read_text())
        return float(peaks["fp32"]), float(peaks["bf16"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0, 0.0


def _write(path: Path, peaks: dict[str, float]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(peaks))
        partial.replace(path)  # whole or not at all, whoever else writes it
    except OSError as err:  # a read-only cache costs a measurement per run, nothing else
        log.warning("could not cache the matmul peaks in %s: %s", path, err)
