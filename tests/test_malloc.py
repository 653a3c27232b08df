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
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000")
    assert malloc.worker_env(None) == {"MALLOC_MMAP_THRESHOLD_": "131072"}
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


MMAPPED_AFTER_FREE = """
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]
libc.mallinfo2.restype = Info
libc.free(libc.malloc(1 << 20))  # glibc's own rule: the next 1 MiB comes from the heap
before = libc.mallinfo2().hblks
block = libc.malloc(1 << 20)
print(libc.mallinfo2().hblks - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_a_world_of_one_on_glibc_returns_freed_memory_at_once():
    """apply_here(None) fixes glibc's mmap threshold: blocks over 128 KiB keep being mapped
    (and unmapped at free) where glibc would otherwise keep them in its heap."""
    plain = {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD"}
    env = {k: v for k, v in os.environ.items() if k not in plain}
    for code, mapped in (("", "0"), ("from meshtrain import malloc; malloc.apply_here(None)", "1")):
        script = code + "\n" + MMAPPED_AFTER_FREE
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True
        )
        assert out.stdout.strip() == mapped, out.stderr
