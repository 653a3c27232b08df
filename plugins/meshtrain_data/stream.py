"""Packed windows -> this dp rank's rows of every global batch; deterministic and resumable.

Window w is tokens[w*S : w*S + S + 1] (S = seq_len): neighbours share one token, so every token
after the first is a label once per epoch. A row's inputs are its window less the last token, its
labels the window less the first. The tail shorter than S + 1 tokens is dropped (never padded),
so no label is IGNORE_INDEX.

Global position p = 0, 1, 2, ... reads window order_e[p % W] of epoch e = p // W, where order_e
is a permutation drawn from (seed, e) (or 0..W-1 without shuffling). Step t's global batch is
positions [t*G, (t+1)*G), G = ctx.global_batch, and dp rank r keeps rows [r*n, (r+1)*n),
n = micro_batch_size * grad_acc. Only that row range depends on the layout, so dp, pp and
grad_acc never change which windows form a global batch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meshtrain.api import Batch, DataContext, UserError

log = logging.getLogger("meshtrain.data")


class PackedStream:
    """A `DataStream` over a flat (memory-mapped) array of token ids."""

    def __init__(self, tokens: np.ndarray, ctx: DataContext, *, shuffle: bool):
        self.tokens = tokens
        self.seq_len = ctx.seq_len
        self.windows = (len(tokens) - 1) // ctx.seq_len
        assert self.windows > 0, "prepare() checks for at least one window"
        self.seed, self.shuffle = ctx.seed, shuffle
        self.global_batch = ctx.global_batch
        self.rows = ctx.micro_batch_size * ctx.grad_acc
        self.first_row = ctx.dp_rank * self.rows
        self.position = 0  # global windows consumed, over all epochs
        self._orders: dict[int, np.ndarray] = {}

    def next_batch(self) -> Batch:
        start = self.position + self.first_row
        ids = [self._window(p) for p in range(start, start + self.rows)]
        rows = np.stack(
            [self.tokens[w * self.seq_len : w * self.seq_len + self.seq_len + 1] for w in ids]
        )  # (n, S + 1)
        self._log_new_epochs(self.position, self.position + self.global_batch)
        self.position += self.global_batch
        windows = torch.from_numpy(rows.astype(np.int64))
        return Batch(windows[:, :-1].contiguous(), windows[:, 1:].contiguous())

    def _window(self, position: int) -> int:
        epoch, index = divmod(position, self.windows)
        return int(self._order(epoch)[index])

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # a batch usually spans at most two epochs
                self._orders.pop(min(self._orders))
            rng = np.random.default_rng([self.seed, epoch])
            self._orders[epoch] = (
                rng.permutation(self.windows) if self.shuffle else np.arange(self.windows)
            )
        return self._orders[epoch]

    def _log_new_epochs(self, start: int, end: int) -> None:
        first = max(1, -(-start // self.windows))  # epochs whose first window is in [start, end)
        for epoch in range(first, (end - 1) // self.windows + 1):
            log.info(
                "data: epoch %d begins (%d windows of %d tokens per epoch)",
                epoch,
                self.windows,
                self.seq_len + 1,
            )

    def state_dict(self) -> dict[str, Any]:
        epoch, index = divmod(self.position, self.windows)
        return {"epoch": epoch, "position": index, "windows": self.windows}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        windows = int(state.get("windows", self.windows))
        if windows != self.windows:
            log.warning(
                "data: the checkpoint saw %d windows per epoch, the data now has %d; "
                "continuing from the same epoch and position",
                windows,
                self.windows,
            )
        self.position = int(state["epoch"]) * self.windows + int(state["position"])


def open_held_out(ctx: DataContext, missing: str) -> PackedStream:
    """The held-out tokens `prepare` published, unshuffled from their first window: every
    evaluation reads the same global batches, whatever the layout or a resume. `missing`: the
    one-line error when `prepare` set nothing aside."""
    from meshtrain_data.packing import load_tokens, read_pointer

    pointer = read_pointer(ctx)
    held = pointer.get("eval")
    if not held:
        raise UserError(pointer.get("eval_problem") or missing)
    return PackedStream(load_tokens(Path(held)), ctx, shuffle=False)
