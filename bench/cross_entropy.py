"""The loss's speed on this machine: meshtrain's chunked cross-entropy against `F.cross_entropy`,
forward and backward of 512 tokens, on each rank's share of the reference vocabulary.

    python bench/cross_entropy.py     # best of 7, ms; CPU model and matmul peaks first

Cases: 24576 columns on one thread (a tp 2 rank of the reference run: its workers run one thread
each) and 49152 on every core (one process).
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from runner import machine_line, measure_machine

from meshtrain.cross_entropy import token_cross_entropy

TOKENS = 512
CASES = ((24576, 1), (49152, os.cpu_count() or 1))
REPEATS = 7


def best_ms(loss_fn, logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(best wall ms of forward + backward, the loss)."""
    times, loss = [], None
    for _ in range(REPEATS):
        x = logits.clone().requires_grad_()
        start = time.perf_counter()
        loss = loss_fn(x.view_as(x), labels)  # a view: the chunked loss works in its memory
        torch.autograd.grad(loss, x)
        times.append(time.perf_counter() - start)
    return 1e3 * min(times), float(loss.detach())


def main() -> None:
    print(machine_line(measure_machine(1.5)))
    for columns, threads in CASES:
        torch.set_num_threads(threads)
        generator = torch.Generator().manual_seed(0)
        logits = 3 * torch.randn(1, TOKENS, columns, generator=generator)
        labels = torch.randint(0, columns, (1, TOKENS), generator=generator)
        plain, expected = best_ms(
            lambda x, y: F.cross_entropy(x.flatten(0, 1), y.flatten(), reduction="sum"),
            logits,
            labels,
        )
        chunked, loss = best_ms(token_cross_entropy, logits, labels)
        print(
            f"{TOKENS} tokens x {columns} columns, {threads} thread(s): F.cross_entropy "
            f"{plain:.1f} ms, chunked {chunked:.1f} ms ({plain / chunked:.2f}x); "
            f"loss rel. diff {abs(loss - expected) / abs(expected):.1e}"
        )


if __name__ == "__main__":
    main()
