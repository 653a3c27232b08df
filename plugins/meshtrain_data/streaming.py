"""Windows cut while reading (`streaming = true`): corpora larger than memory, read by dp share.

Lanes. Row j of every global batch (j < G = micro_batch_size * grad_acc * dp) comes from lane j,
and lane j owns the documents whose index d in the stream has d % G == j: it joins them with
EOS and cuts windows of seq_len + 1 tokens with stride seq_len, as the packed cache does; what is
left at the end of an epoch carries into the next. G is the global batch, so which tokens form a
global batch does not depend on dp (nor on grad_acc or micro_batch_size at a given G). A dp rank
owns lanes [r * n, (r + 1) * n), n = micro_batch_size * grad_acc: it tokenizes only its own
documents (a 1/dp share) and skips the others' without decoding them.

One reader per rank walks the stream once; each own lane keeps the tokens of documents it has
been handed and not yet cut, so memory is the lanes' queues (a document or so each), not the
corpus. Resume: the reader's position (`datasets`' own state: the file and the row in it), the
queues and the document index; nothing already read is read again. In another dp layout the
queues of the new lanes are not in the checkpoint: the stream is then re-read from its start up
to the saved document (correct, slower).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from meshtrain.api import Batch, DataContext, UserError

log = logging.getLogger("meshtrain.data")
CHUNK = 256
"""Documents read per tokenizer call (the own ones among them)."""


class StreamingStream:
    """A `DataStream` over `open_rows()`: a `datasets.IterableDataset` of dicts with `column`."""

    def __init__(
        self,
        open_rows: Callable[[], Any],
        column: str,
        tokenizer: Any,
        ctx: DataContext,
        *,
        describe: str,
    ):
        self.open_rows, self.column, self.tokenizer = open_rows, column, tokenizer
        self.describe, self.size = describe, ctx.seq_len + 1
        self.lanes_total = ctx.global_batch
        rows = ctx.micro_batch_size * ctx.grad_acc
        self.lanes = range(ctx.dp_rank * rows, (ctx.dp_rank + 1) * rows)
        self.queues: dict[int, list[int]] = {lane: [] for lane in self.lanes}
        self.position = 0  # global windows consumed
        self.epoch = 0
        self.document = 0  # index in this epoch of the next document the reader yields
        self.tokenized = 0  # documents this rank tokenized (for tests and logs)
        self._dataset: Any = None
        self._reader: Iterator[dict] | None = None

    # -------------------------------------------------------------------- reading

    def _open(self, state: Mapping[str, Any] | None = None) -> None:
        self._dataset = self.open_rows()
        if state is not None:
            self._dataset.load_state_dict(dict(state))
        self._reader = iter(self._dataset)

    def _read_chunk(self, limit: int = CHUNK) -> None:
        """Read up to `limit` documents; tokenize the own ones into their lanes' queues."""
        if self._reader is None:
            self._open()
        own: list[tuple[int, str]] = []
        for _ in range(limit):
            row = next(self._reader, None)
            if row is None:
                self._next_epoch()
                break
            lane = self.document % self.lanes_total
            self.document += 1
            if lane in self.queues:
                text = row.get(self.column)
                if isinstance(text, str) and text:
                    own.append((lane, text))
        if own:
            eos = self.tokenizer.eos_token_id
            encoded = self.tokenizer([t for _, t in own], add_special_tokens=False)["input_ids"]
            for (lane, _), ids in zip(own, encoded, strict=True):
                self.queues[lane].extend(ids)
                self.queues[lane].append(eos)
            self.tokenized += len(own)

    def _next_epoch(self) -> None:
        if self.document == 0:
            raise UserError(f"data.dataset: {self.describe!r} holds no rows")
        if self.document < self.lanes_total:
            raise UserError(
                f"data.dataset: {self.describe!r} holds {self.document} documents, fewer than "
                f"the {self.lanes_total} rows of a global batch (streaming gives each row "
                "documents of its own)"
            )
        self.epoch += 1
        self.document = 0
        log.info("data: epoch %d begins (streaming %s)", self.epoch, self.describe)
        self._open()

    # -------------------------------------------------------------------- DataStream

    def next_batch(self) -> Batch:
        rows = []
        for lane in self.lanes:
            queue = self.queues[lane]
            start_epoch = self.epoch
            while len(queue) < self.size:
                self._read_chunk()
                if self.epoch > start_epoch + 1:  # two passes gave this lane no window
                    raise UserError(
                        f"data.dataset: {self.describe!r} is too small for streaming: row "
                        f"{lane} of the global batch got fewer than train.seq_len + 1 tokens "
                        "in a whole epoch"
                    )
            rows.append(queue[: self.size])
            del queue[: self.size - 1]  # neighbours share one token, as in the packed cache
        self.position += self.lanes_total
        windows = torch.tensor(rows, dtype=torch.long)  # (n, S + 1)
        return Batch(windows[:, :-1].contiguous(), windows[:, 1:].contiguous())

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "document": self.document,
            "lanes_total": self.lanes_total,
            "queues": {str(lane): list(queue) for lane, queue in self.queues.items()},
            "reader": self._dataset.state_dict() if self._dataset is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        queues = state.get("queues") or {}
        mine = {str(lane) for lane in self.lanes}
        if state.get("lanes_total") != self.lanes_total:
            raise UserError(
                "train.micro_batch_size: a streaming run resumes at the same global batch "
                f"({state.get('lanes_total')} rows), this run has {self.lanes_total}"
            )
        self.position = int(state["position"])
        if mine <= set(queues) and state.get("reader") is not None:
            self.epoch, self.document = int(state["epoch"]), int(state["document"])
            self.queues = {lane: list(queues[str(lane)]) for lane in self.lanes}
            self._open(state["reader"])
            return
        # Another dp layout: rebuild this rank's lanes by reading up to the saved place, then
        # drop the tokens the windows so far took (each window advances a lane by seq_len).
        log.info("data: streaming resume in another layout re-reads %s", self.describe)
        epoch, document = int(state["epoch"]), int(state["document"])
        self.queues = {lane: [] for lane in self.lanes}
        self.epoch = self.document = 0
        self._dataset = self._reader = None
        while (self.epoch, self.document) < (epoch, document):
            left = CHUNK if self.epoch < epoch else min(CHUNK, document - self.document)
            self._read_chunk(left)
        taken = self.position // self.lanes_total * (self.size - 1)
        for queue in self.queues.values():
            del queue[:taken]
