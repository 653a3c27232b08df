"""Which malloc CPU workers run on (`run.malloc`): tcmalloc where it is installed, else glibc's.

    env = worker_env(choose(config.run.malloc, device_type))   # the launcher, before workers start

Every CPU tensor comes from malloc. glibc serves a large block with a fresh mmap and unmaps it
at free, so a training step that allocates gigabytes of activations, gathered weights and
gradients faults every page of them in again, zeroed by the kernel: a third of the CPU time of
an 8-worker run here went to page faults (perf). Two answers:

- glibc, with transparent huge pages on its mapped blocks (GLIBC): one fault maps 2 MiB instead
  of 4 KiB, 4.5x the rate of faulting in fresh memory here, and freed memory still goes back at
  once, which keeps the peak lowest (`run.malloc = "system"`, and `auto` where tcmalloc is not
  installed). Where the kernel gives no huge pages (transparent_hugepage "never"), only the
  thresholds apply.
- tcmalloc keeps freed pages for the next allocation (no faults at all), at a higher peak
  (RETAINED). It is not a Python package: the launcher preloads the system's library
  (Debian/Ubuntu `libtcmalloc-minimal4`, or gperftools) into the forkserver its workers fork from.

How much the faults cost depends on the machine more than on meshtrain: in a VM whose kernel
reports free memory to the host (virtio-balloon free page reporting), a freed 2 MiB block goes
back to the host and is backed again at the next touch, 0.6 GiB/s against 8.3 for memory a process
holds on session 11's machine (`bench/fresh_memory.py`; `bench/run.py` prints it).

Both are set through the environment, which a process reads at startup: meshtrain's own
launcher starts its workers with it; a world of one, and each worker torchrun or srun started,
re-executes itself with it.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import sysconfig
from pathlib import Path

from meshtrain.errors import UserError

log = logging.getLogger("meshtrain")

PRELOAD = "LD_PRELOAD"
TCMALLOC = ("tcmalloc_minimal", "tcmalloc")
"""Library names tried in order (gperftools' minimal build first: no heap profiler)."""
GLIBC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
"""On glibc, processes give freed memory back to the OS at once instead of keeping it in arenas
(with 8 workers on one machine, retained arenas alone are gigabytes); set where the user has not."""
TUNABLES = "GLIBC_TUNABLES"
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
HUGE_PAGES = "glibc.malloc.hugetlb=1"
"""glibc >= 2.35: madvise(MADV_HUGEPAGE) on what malloc maps; added to the user's tunables unless
they name glibc.malloc.hugetlb themselves."""
RESTARTED = "MESHTRAIN_MALLOC_RESTARTED"
"""Set in a restarted command, so that a library the loader refused cannot restart it again."""
RETAINED = "+26% at dp2 pp2 tp2 (5 steps), +9% at tp2 pp2"
"""How far tcmalloc's peaks ran above glibc's (bench/run.py, ref-8 and ref-tp2pp2 pairs)."""
INSTALL = "apt install libtcmalloc-minimal4 (or gperftools)"


def find_tcmalloc() -> str | None:
    """The path of this machine's tcmalloc, or None: a conda or venv install first, as torch's
    xeon launcher looks, then the system's library folders."""
    arch = sysconfig.get_config_var("MULTIARCH") or ""
    prefixes = [sys.prefix, os.environ.get("CONDA_PREFIX", sys.prefix), "/usr/local", "/usr"]
    folders = dict.fromkeys(
        Path(p, lib) for p in prefixes for lib in (f"lib/{arch}", "lib64", "lib")
    )
    for name in TCMALLOC:
        for folder in folders:
            found = sorted(folder.glob(f"lib{name}.so*"))
            if found:
                return str(found[0])
    return None


def choose(setting: str, device_type: str) -> str | None:
    """The library `run.malloc` asks for here (None: glibc's malloc). GPU runs keep the system's:
    their large tensors live in the device's own caching allocator."""
    if setting == "system" or (setting == "auto" and device_type != "cpu"):
        return None
    path = find_tcmalloc()
    if path is None and setting == "tcmalloc":
        raise UserError(f"run.malloc = 'tcmalloc': no libtcmalloc on this machine; {INSTALL}")
    return path


def worker_env(library: str | None) -> dict[str, str]:
    """What to add to the environment of processes started on `library` (None: glibc, with
    GLIBC's thresholds and huge pages, each where the user did not set it)."""
    if library is None:
        env = {key: value for key, value in GLIBC.items() if key not in os.environ}
        tunables = os.environ.get(TUNABLES, "")
        if HUGE_PAGES.split("=")[0] not in tunables:
            env[TUNABLES] = f"{tunables}:{HUGE_PAGES}" if tunables else HUGE_PAGES
        return env
    preload = os.environ.get(PRELOAD, "")
    if library in preload.split(":"):
        return {}
    return {PRELOAD: f"{library}:{preload}" if preload else library}


def apply_here(library: str | None) -> None:
    """Put this process (a world of one trains in the process the user started) on `library`:
    execute the command again with `worker_env`, unless it has nothing to add, or this process
    is already a restart (a library the loader refused must not restart it again)."""
    if library is None and platform.libc_ver()[0] != "glibc":
        return  # another C library: nothing of this applies
    if library is not None and loaded() != "system":
        return
    env = worker_env(library)
    if not env or os.environ.get(RESTARTED):
        return
    log.info("run.malloc: restarting on %s", library or "glibc with huge pages")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, **env, RESTARTED: "1"})


def huge_pages() -> str:
    """The kernel's transparent huge page mode ("always", "madvise", "never"; "" where unknown)."""
    try:
        text = THP.read_text()
    except OSError:
        return ""
    return text[text.find("[") + 1 : text.find("]")]


def loaded() -> str:
    """The malloc this process runs on, in words: a preloaded library's file name or glibc."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for line in maps.splitlines():
        if any(f"/lib{name}.so" in line for name in TCMALLOC):
            return Path(line.split()[-1]).name
    return "system"
