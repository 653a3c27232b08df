"""`source = "synthetic"`: uniform random tokens for benchmarks; no files, no prepare work.

Row p of the endless stream is drawn from a generator seeded with (train.seed, p) (held-out rows
for [eval]: (train.seed, p, 1)), so a rank
draws only its own rows and every layout sees the same global batches. With data.masked_share,
the same generator then picks the row's IGNORE_INDEX labels, after its tokens: the tokens do not
change, and every layout masks the same labels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from meshtrain.api import IGNORE_INDEX, Batch, DataContext
from meshtrain_data.options import SyntheticOptions, as_options


class SyntheticStream:
    """A `DataStream` of random token ids in [0, model.vocab_size); labels are the next ids,
    a `masked_share` of them IGNORE_INDEX."""

    def __init__(self, ctx: DataContext, masked_share: float = 0.0, held_out: bool = False):
        self.ctx, self.masked_share = ctx, masked_share
        self.stream = (1,) if held_out else ()  # a seed space of its own for [eval]
        self.rows = ctx.micro_batch_size * ctx.grad_acc
        self.position = 0  # global rows consumed

    def next_batch(self) -> Batch:
        start = self.position + self.ctx.dp_rank * self.rows
        rows = np.stack([self._row(p) for p in range(start, start + self.rows)])  # (n, 2, S)
        self.position += self.ctx.global_batch
        rows = torch.from_numpy(rows.astype(np.int64))
        return Batch(rows[:, 0].contiguous(), rows[:, 1].contiguous())

    def _row(self, p: int) -> np.ndarray:
        """Global row p as (inputs, labels): seq_len + 1 tokens, then the masked labels."""
        rng = np.random.default_rng([self.ctx.seed, p, *self.stream])
        tokens = rng.integers(0, self.ctx.vocab_size, self.ctx.seq_len + 1)
        pair = np.stack([tokens[:-1], tokens[1:]])  # a copy: masking labels spares the inputs
        if self.masked_share:
            masked = rng.random(self.ctx.seq_len) < self.masked_share
            if masked.all():  # a row keeps at least one label, so its loss is defined
                masked[rng.integers(self.ctx.seq_len)] = False
            pair[1, masked] = IGNORE_INDEX
        return pair

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
        return SyntheticStream(ctx, as_options(SyntheticOptions, options).masked_share)

    def open_eval(self, options: Any, ctx: DataContext) -> SyntheticStream:
        """Rows drawn from (train.seed, p, 1): never a training row."""
        masked = as_options(SyntheticOptions, options).masked_share
        return SyntheticStream(ctx, masked, held_out=True)
