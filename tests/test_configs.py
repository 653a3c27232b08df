"""Configs tier (`make configs`, not in the default run: 23 minutes on 2 cores): every
configs/*.toml trains at dp2 pp2 tp2 on the offline corpus and its loss falls.

Each config keeps its architecture (the real hidden sizes, heads and vocabulary, cut to a few
layers), family and lr; the run is shortened to 4 steps of 2 micro-batches x 1 x 32 tokens, no
warmup. (At lr 1e-3 Mistral's 4096-wide layers spiked at step 3.)
Each config gets a world of its own: memory that one run's workers keep (a large vocabulary's
embedding, allocator caches) would pile up in a shared one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.spawn import run_world

pytestmark = [pytest.mark.configs, pytest.mark.dist]

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(ROOT.glob("configs/*.toml"))
SHORT = [
    "parallel.dp=2",
    "parallel.pp=2",
    "parallel.tp=2",
    'pipeline.schedule="1f1b"',
    'data.source="offline"',
    "train.steps=4",
    "train.grad_acc=2",
    "train.micro_batch_size=1",
    "train.seq_len=32",
    "train.warmup_steps=0",
    "checkpoint.every=0",
    'checkpoint.resume="never"',
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_trains_at_dp2_pp2_tp2_and_the_loss_falls(tmp_path, config):
    (history,) = run_world(8, [(str(config), [*SHORT, f'run.dir="{tmp_path / "run"}"'])], tmp_path)
    losses = [m["loss"] for m in history]
    assert len(losses) == 4, history
    # The real architectures fall by nats; the tiny ones (2048-token vocabularies, ln V = 7.6)
    # by a few hundredths in 3 updates of 2 x 32 tokens.
    assert losses[-1] < losses[0] - 0.05, f"{config.name}: losses {losses}"
