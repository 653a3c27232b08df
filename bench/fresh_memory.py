"""How fast this machine gives a process fresh memory, against memory the process already holds.

    python bench/fresh_memory.py     # prints both rates, measured the way glibc workers allocate

A page a process touches for the first time is faulted in and zeroed by the kernel. Under a
hypervisor with free page reporting (virtio-balloon), memory the guest's kernel has had free for
a while is handed back to the host, and the host backs it again on the next touch: on the machine
of session 11 (a 2-core Intel Xeon VM, reporting 2 MiB blocks as soon as they are free) this
measured 0.6 GiB/s fresh against 8.3 for memory it held. `run.malloc = "system"` gives freed
blocks back at once, so this rate prices every fresh activation, gathered weight and gradient of
a step; tcmalloc keeps them (meshtrain/malloc.py). `bench/run.py` prints it in its header.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPORTING = Path("/sys/module/page_reporting/parameters")
MIB = 1 << 20


def measure() -> dict[str, Any]:
    """Fresh and warm fill rates in GiB/s, from a process on the workers' glibc settings (huge
    pages, freed blocks given back), and the kernel's page reporting parameters (empty where
    the kernel has none)."""
    from meshtrain.malloc import worker_env

    done = subprocess.run(
        [sys.executable, __file__],
        env={**os.environ, **worker_env(None)},
        capture_output=True,
        text=True,
        check=True,
    )
    return {**json.loads(done.stdout), "page_reporting": page_reporting()}


def page_reporting() -> dict[str, str]:
    """The kernel's free page reporting settings, where it exposes them: the smallest block it
    reports (`page_reporting_order`, 9 = 2 MiB) and, on kernels that have it, how long a block
    must have been free first (`min_free_ms`)."""
    found = {}
    for name in ("page_reporting_order", "min_free_ms"):
        try:
            found[name] = (REPORTING / name).read_text().strip()
        except OSError:
            pass
    return found


def rates(size_mib: int = 512, tries: int = 3, pause_s: float = 1.0) -> dict[str, float]:
    """GiB/s filling a block allocated just before (the median of `tries`, each after
    `pause_s` with the previous block freed) and filling one block again."""
    import torch

    torch.set_num_threads(1)
    fresh = []
    for _ in range(tries):
        time.sleep(pause_s)
        start = time.perf_counter()
        torch.empty(size_mib * MIB, dtype=torch.uint8).fill_(1)
        fresh.append(size_mib / 1024 / (time.perf_counter() - start))
    block = torch.empty(size_mib * MIB, dtype=torch.uint8)
    block.fill_(1)
    start = time.perf_counter()
    block.fill_(2)
    warm = size_mib / 1024 / (time.perf_counter() - start)
    return {"fresh_gib_s": statistics.median(fresh), "warm_gib_s": warm}


if __name__ == "__main__":
    print(json.dumps(rates()))
