"""`meshtrain.layout`: rank coordinates, exact parameter counts per rank, the memory estimate.

python -m pytest -q tests/test_layout.py
"""

from pathlib import Path

import pytest

from meshtrain.config import load_config
from meshtrain.job import resolve_job
from meshtrain.layout import build_layout, count_parameters, rank_of

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.toml"


def layout(*overrides: str):
    job = resolve_job(load_config(TINY, list(overrides)))
    return job, build_layout(job)


def test_rank_order_puts_tp_innermost():
    coords = [(d, p, t) for d in range(2) for p in range(2) for t in range(2)]
    assert [rank_of(d, p, t, 2, 2) for d, p, t in coords] == list(range(8))


def test_pipeline_ranks_hold_every_parameter_once_plus_the_tied_head():
    job, rows = layout("parallel.pp=2")
    embedding = job.shape.vocab_size * job.shape.hidden_size
    assert [row.stages for row in rows] == [[0], [1]]
    # the tied head is stored on the last stage as well as the embedding on the first
    assert sum(row.params for row in rows) == count_parameters(job) + embedding


@pytest.mark.parametrize("tp", [1, 2])
def test_tp_splits_weights_and_keeps_norms(tp):
    job, rows = layout(f"parallel.tp={tp}")
    hidden, layers = job.shape.hidden_size, job.shape.num_layers
    norms = (2 * layers + 1) * hidden
    assert {row.params for row in rows} == {(count_parameters(job) - norms) // tp + norms}


def test_dp_shard_divides_everything_and_the_state():
    _, replicated = layout("parallel.dp=2")
    _, sharded = layout("parallel.dp=2", "parallel.dp_shard=true")
    assert sharded[0].params == replicated[0].params // 2
    assert sharded[0].memory.state == replicated[0].memory.state // 2
    assert sharded[0].memory.activations == replicated[0].memory.activations


def test_memory_first_stage_holds_more_micro_batches_last_holds_logits():
    _, rows = layout("parallel.pp=2")
    first, last = rows[0].memory, rows[1].memory
    assert first.logits == 0 and last.logits > 0
    assert first.activations == 2 * last.activations  # 1F1B: 2 vs 1 in flight, 2 layers each
    assert first.total > first.state + first.baseline
