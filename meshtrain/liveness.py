"""Which ranks are gone when a collective fails: heartbeats in the job's TCP store.

    liveness.start()                  # every worker, once its process group is up
    liveness.lost()                   # after a failure: 'ranks 4-7 stopped ...' or ''
    liveness.stop()

A worker killed with its node (or by the OOM killer) says nothing; its peers only see "connection
reset" from gloo or NCCL. Each worker bumps `meshtrain/beat/<rank>` in the store that torchrun or
meshtrain's launcher already runs (MASTER_ADDR:MASTER_PORT) every INTERVAL seconds; a worker whose
step fails marks `meshtrain/failed/<rank>`, waits a few intervals and names the ranks whose
counter stood still and that did not fail themselves.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import timedelta

log = logging.getLogger("meshtrain")
INTERVAL = 1.0
_current: Heartbeat | None = None


def start() -> None:
    """Start this worker's heartbeat (after init_process_group: rank 0 may host the store)."""
    global _current
    stop()
    _current = Heartbeat.start()


def stop(forget: bool = True) -> None:
    """Stop beating and wait for the thread (a thread inside a store call at interpreter exit
    aborts the process); `forget=False` keeps the store for `lost()` after a failure."""
    global _current
    if _current is not None:
        _current.stop()
    if forget:
        _current = None


def lost() -> str:
    """After a failure: a line naming the ranks that stopped without an error, or ''."""
    return describe(_current.lost_ranks()) if _current is not None else ""


class Heartbeat:
    def __init__(self, store: object, rank: int, world: int):
        self.store, self.rank, self.world = store, rank, world
        self._stop = threading.Event()
        self._count = 0
        self._thread = threading.Thread(target=self._run, name="meshtrain-heartbeat", daemon=True)

    @classmethod
    def start(cls) -> Heartbeat | None:
        """A running heartbeat, or None outside a multi-process job (or without a store)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if world < 2 or not addr or not port:
            return None
        try:
            import torch.distributed as dist

            store = dist.TCPStore(
                addr,
                int(port),
                is_master=False,
                timeout=timedelta(seconds=10),
                wait_for_workers=False,
            )
        except Exception as err:  # no store to reach: no lost-rank names, training goes on
            log.debug("heartbeat: no store at %s:%s (%s)", addr, port, err)
            return None
        beat = cls(store, int(os.environ.get("RANK", "0")), world)
        beat._thread.start()
        return beat

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL):
            try:
                self._count += 1
                self.store.set(f"meshtrain/beat/{self.rank}", str(self._count))
            except Exception:  # the store is gone (its node died): nothing left to tell
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5 * INTERVAL)

    def lost_ranks(self, wait: float = 4 * INTERVAL) -> list[int] | None:
        """Ranks that stopped without failing: their beat did not move in `wait` seconds and
        they set no failed mark. None when the store itself cannot be reached (it lives with
        rank 0's node, so that node is the lost one)."""
        self.stop()
        try:
            self.store.set(f"meshtrain/failed/{self.rank}", "1")
            before = self._beats()
            time.sleep(wait)
            after = self._beats()
            failed = {r for r in range(self.world) if self.store.check([f"meshtrain/failed/{r}"])}
        except Exception:
            return None
        return [
            r
            for r in range(self.world)
            if r != self.rank and before[r] == after[r] and r not in failed
        ]

    def _beats(self) -> list[str]:
        keys = [f"meshtrain/beat/{r}" for r in range(self.world)]
        return [self.store.get(k).decode() if self.store.check([k]) else "" for k in keys]


def describe(ranks: list[int] | None) -> str:
    """'ranks 4-7 stopped ...' for a log line; '' when none did."""
    if ranks is None:
        return "the job's store (on rank 0's node) cannot be reached: that node is lost"
    spans: list[list[int]] = []
    for rank in ranks:
        if spans and rank == spans[-1][1] + 1:
            spans[-1][1] = rank
        else:
            spans.append([rank, rank])
    if not spans:
        return ""
    names = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return (
        f"rank{'s' * (len(ranks) > 1)} {names} stopped without an error (no heartbeat for "
        "several seconds): a lost node, or workers killed (e.g. out of memory)"
    )
