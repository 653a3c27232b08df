"""Windows cut while reading (`streaming = true`): for corpora too big to pack up front.

Documents are read in dataset order (no shuffle), joined with EOS and cut into windows of
seq_len + 1 tokens with stride seq_len, exactly as the packed cache would cut them; the tokens
left over at the end of an epoch carry into the next. Every rank reads and tokenizes the whole
stream and keeps its own rows of each global batch, so the batches do not depend on dp; resuming
re-reads the stream up to the saved position (cheap next to training, but not free).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from meshtrain.api import Batch, DataContext, UserError
from meshtrain_data.packing import encode_documents

log = logging.getLogger("meshtrain.data")


class StreamingStream:
    """A `DataStream` over batches of texts from `open_texts()`, re-opened every epoch."""

    def __init__(
        self,
        open_texts: Callable[[], Iterable[list[Any]]],
        tokenizer: Any,
        ctx: DataContext,
        *,
        describe: str,
    ):
        self.open_texts, self.tokenizer, self.ctx = open_texts, tokenizer, ctx
        self.describe = describe
        self.rows = ctx.micro_batch_size * ctx.grad_acc
        self.position = 0  # global windows consumed
        self.epoch = 0
        self._windows = self._cut()

    def _cut(self) -> Iterator[list[int]]:
        size, buffer = self.ctx.seq_len + 1, []
        for epoch in itertools.count():
            self.epoch = epoch
            if epoch:
                log.info("data: epoch %d begins (streaming %s)", epoch, self.describe)
            produced = False
            eos = self.tokenizer.eos_token_id
            for ids, _ in encode_documents(self.open_texts(), self.tokenizer, eos):
                produced = True
                buffer.extend(ids)
                while len(buffer) >= size:
                    yield buffer[:size]
                    del buffer[: size - 1]  # neighbours share one token, as in the packed cache
            if not produced:
                raise UserError(f"data.dataset: {self.describe!r} holds no text")

    def next_batch(self) -> Batch:
        lo = self.ctx.dp_rank * self.rows
        window = list(itertools.islice(self._windows, self.ctx.global_batch))
        self.position += self.ctx.global_batch
        rows = torch.tensor(window[lo : lo + self.rows], dtype=torch.long)  # (n, S + 1)
        return Batch(rows[:, :-1].contiguous(), rows[:, 1:].contiguous())

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._windows = self._cut()
        self.position = int(state["position"])
        for _ in itertools.islice(self._windows, self.position):
            pass
