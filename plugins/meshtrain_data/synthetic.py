"""`source = "synthetic"`: uniform random tokens for benchmarks; no files, no prepare work.

Row p of the endless stream is drawn from a generator seeded with (train.seed, p), so a rank
draws only its own rows and every layout sees the same global batches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from meshtrain.contracts import DataContext
from meshtrain_data.options import SyntheticOptions, as_options


class SyntheticStream:
    """A `DataStream` of (n, seq_len + 1) random token ids in [0, model.vocab_size)."""

    def __init__(self, ctx: DataContext):
        self.ctx = ctx
        self.rows = ctx.micro_batch_size * ctx.grad_acc
        self.position = 0  # global rows consumed

    def next_batch(self) -> torch.Tensor:
        start = self.position + self.ctx.dp_rank * self.rows
        rows = [
            np.random.default_rng([self.ctx.seed, p]).integers(
                0, self.ctx.vocab_size, self.ctx.seq_len + 1
            )
            for p in range(start, start + self.rows)
        ]
        self.position += self.ctx.global_batch
        return torch.from_numpy(np.stack(rows).astype(np.int64))  # (n, S + 1)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": 0, "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.position = int(state["position"])


class SyntheticSource:
    """Random tokens over the model's whole vocabulary; loss does not fall, throughput is real."""

    config_class = SyntheticOptions

    def prepare(self, options: Any, ctx: DataContext) -> None:
        as_options(SyntheticOptions, options)

    def open(self, options: Any, ctx: DataContext) -> SyntheticStream:
        as_options(SyntheticOptions, options)
        return SyntheticStream(ctx)
