"""run.malloc: which library is chosen, what workers' environment gets, and that a preloaded
tcmalloc is what a process then runs on (the subprocess checks need tcmalloc installed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from meshtrain import malloc
from meshtrain.errors import UserError

FOUND = malloc.find_tcmalloc()
needs_tcmalloc = pytest.mark.skipif(FOUND is None, reason="no tcmalloc on this machine")


def test_choice_follows_the_setting_and_device(monkeypatch):
    assert malloc.choose("system", "cpu") is None
    assert malloc.choose("auto", "cuda") is None
    monkeypatch.setattr(malloc, "find_tcmalloc", lambda: "/opt/libtcmalloc.so.4")
    assert malloc.choose("auto", "cpu") == "/opt/libtcmalloc.so.4"
    assert malloc.choose("tcmalloc", "cuda") == "/opt/libtcmalloc.so.4"
    monkeypatch.setattr(malloc, "find_tcmalloc", lambda: None)
    assert malloc.choose("auto", "cpu") is None
    with pytest.raises(UserError, match=r"^run\.malloc = 'tcmalloc': no libtcmalloc"):
        malloc.choose("tcmalloc", "cpu")


def test_worker_env_keeps_what_the_user_set(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000")
    assert malloc.worker_env(None) == {
        "MALLOC_MMAP_THRESHOLD_": "131072",
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
    }
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.pthread.rseq=0")
    assert (
        malloc.worker_env(None)["GLIBC_TUNABLES"] == "glibc.pthread.rseq=0:glibc.malloc.hugetlb=1"
    )
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
    assert "GLIBC_TUNABLES" not in malloc.worker_env(None)
    assert malloc.worker_env("/x/libtcmalloc.so") == {"LD_PRELOAD": "/x/libtcmalloc.so"}
    monkeypatch.setenv("LD_PRELOAD", "/y/libfoo.so")
    assert malloc.worker_env("/x/libtcmalloc.so") == {
        "LD_PRELOAD": "/x/libtcmalloc.so:/y/libfoo.so"
    }
    monkeypatch.setenv("LD_PRELOAD", "/x/libtcmalloc.so")
    assert malloc.worker_env("/x/libtcmalloc.so") == {}


def _loaded_in(env: dict[str, str], code: str = "") -> str:
    script = f"from meshtrain import malloc\n{code}\nprint(malloc.loaded())"
    env = {**os.environ, **env}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


@needs_tcmalloc
def test_a_preloaded_tcmalloc_is_what_runs_and_a_restart_takes_it():
    plain = {"LD_PRELOAD": "", malloc.RESTARTED: ""}
    assert _loaded_in(plain) == "system"
    assert _loaded_in({**plain, **malloc.worker_env(FOUND)}).startswith("libtcmalloc")
    restarted = _loaded_in(plain, f"malloc.apply_here({FOUND!r})")
    assert restarted.startswith("libtcmalloc")


GLIBC_BLOCKS = """
import ctypes, re
from pathlib import Path
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]
libc.mallinfo2.restype = Info
def huge_kib():
    text = Path("/proc/self/smaps_rollup").read_text()
    return int(re.search(r"AnonHugePages:\\s+(\\d+)", text).group(1))
libc.free(libc.malloc(8 << 20))  # glibc's own rule: the next 8 MiB comes from the heap
before = libc.mallinfo2().hblks
block = libc.malloc(8 << 20)  # over the heap's top (which huge pages round up to 2 MiB)
mapped = libc.mallinfo2().hblks - before
huge = huge_kib()
big = libc.malloc(16 << 20)
libc.memset(big, 1, 16 << 20)
print(mapped, huge_kib() - huge)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
def test_a_world_of_one_on_glibc_restarts_with_the_workers_settings():
    """apply_here(None) executes the process again with worker_env(None): blocks over 128 KiB
    keep being mapped (and unmapped at free) where glibc would otherwise keep them in its heap,
    and, where the kernel gives transparent huge pages on request (madvise), in 2 MiB pages."""
    plain = {*malloc.GLIBC, malloc.TUNABLES, malloc.RESTARTED, "LD_PRELOAD"}
    env = {k: v for k, v in os.environ.items() if k not in plain}
    huge = malloc.huge_pages() == "madvise"
    for code, restarted in (
        ("", False),
        ("from meshtrain import malloc; malloc.apply_here(None)", True),
    ):
        out = subprocess.run(
            [sys.executable, "-c", code + "\n" + GLIBC_BLOCKS],
            env=env,
            capture_output=True,
            text=True,
        )
        mapped, huge_kib = (int(word) for word in out.stdout.split())
        assert mapped == int(restarted), (out.stdout, out.stderr)
        if huge:
            assert (huge_kib >= 2048) == restarted, out.stdout
