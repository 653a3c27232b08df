"""Batches made ahead in a background thread, so reading and tokenizing never stall a step.

    data = Prefetcher(stream, depth=2)
    batch = data.next_batch()      # data.wait_s: how long this call waited
    state = data.state_dict()      # the stream's state after the last batch *taken*

The thread owns the stream: it makes a batch, then records the stream's state right after it,
and queues both (at most `depth` ahead). The state a checkpoint saves is the one that came with
the last batch the step took, so a resume continues with exactly the next batch, whatever was
prefetched. The thread starts on the first `next_batch`, so `load_state_dict` (a resume) goes to
the stream itself before that.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping
from typing import Any


class Prefetcher:
    """A `DataStream` that reads `stream` ahead in a daemon thread."""

    def __init__(self, stream: Any, depth: int = 2):
        self.stream, self.depth = stream, depth
        self.wait_s = 0.0
        """Seconds the last `next_batch` waited for the thread."""
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state: dict[str, Any] | None = None

    def next_batch(self) -> Any:
        if self._thread is None:
            self._state = self.stream.state_dict()
            self._thread = threading.Thread(
                target=self._produce, name="meshtrain-data", daemon=True
            )
            self._thread.start()
        start = time.perf_counter()
        batch, state, error = self._queue.get()
        self.wait_s = time.perf_counter() - start
        if error is not None:
            raise error
        self._state = state
        return batch

    def _produce(self) -> None:
        while not self._stop.is_set():
            try:
                item = (self.stream.next_batch(), self.stream.state_dict(), None)
            except BaseException as err:  # handed to the step, which raises it
                item = (None, None, err)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return

    def state_dict(self) -> dict[str, Any]:
        return self._state if self._state is not None else self.stream.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self._thread is not None:
            raise RuntimeError("Prefetcher: load_state_dict after reading started")
        self.stream.load_state_dict(state)

    def close(self) -> None:
        """Stop the thread (it may be blocked on a full queue)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
