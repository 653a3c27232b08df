"""`meshtrain plan`: layouts, sizes and the schedules' actions it simulates; one CLI run.

The simulated collectives are compared with a real run's in test_e2e; the simulated memory with
real runs in test_memory (slow tier).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from meshtrain_schedules import SCHEDULES

from meshtrain.config import load_config
from meshtrain.errors import UserError
from meshtrain.job import resolve_job
from meshtrain.layout import count_parameters
from meshtrain.plan import layout_overrides, parse_bytes

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_cpu.toml")
V_FSDP_SP_AC = "dp=2,pp=2,tp=2,schedule=zbv,grad_acc=4,dp_shard=true,sp=true,ac=selective"
MOE = """
[model]
family = "mixtral"
hidden_size = 64
intermediate_size = 32
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
num_local_experts = 4
num_experts_per_tok = 2
vocab_size = 2048
max_position_embeddings = 256

[train]
grad_acc = 2
micro_batch_size = 2
seq_len = 64

[parallel]
dp = 4                       # ep 2 of dp 2 would be the world's group, counted as one axis
ep = 2

[data]
source = "synthetic"
"""


def test_sizes_and_layouts_parse():
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("40 GB") == 40 * 10**9
    assert parse_bytes("1.5TiB") == int(1.5 * 2**40)
    assert parse_bytes("512M") == 512 * 2**20
    with pytest.raises(UserError, match="--device-memory"):
        parse_bytes("eighty")
    assert layout_overrides("dp=16, pp=8,tp=8,sp=true,train.seq_len=4096") == [
        "parallel.dp=16",
        "parallel.pp=8",
        "parallel.tp=8",
        "parallel.sequence_parallel=true",
        "train.seq_len=4096",
    ]
    with pytest.raises(UserError, match="--compare"):
        layout_overrides("dp16")


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_schedule_gives_each_micro_batch_a_forward_and_a_backward(name):
    schedule, pp, n = SCHEDULES[name], 4, 8
    for rank in range(pp):
        actions = schedule.actions(rank, pp, n)
        stages = schedule.placement(rank, pp)
        for stage in stages:
            forwards = [m for kind, s, m in actions if kind == "F" and s == stage]
            backwards = [m for kind, s, m in actions if kind in ("B", "I") and s == stage]
            assert forwards == list(range(n)) and backwards == list(range(n)), (rank, stage)
            for micro in range(n):  # a backward comes after its forward
                f = actions.index(("F", stage, micro))
                b = next(i for i, a in enumerate(actions) if a[1:] == (stage, micro) and i > f)
                assert actions[b][0] in ("B", "I")


def test_plan_compares_layouts_as_json():
    result = subprocess.run(
        [sys.executable, "-m", "meshtrain", "plan", TINY, "--device-memory", "1GiB", "--json"]
        + ["--compare", "dp=2,tp=2", "pp=2,grad_acc=2", V_FSDP_SP_AC],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tp2, pp2, v = json.loads(result.stdout)
    assert (tp2["world"], tp2["tp"], len(tp2["ranks"])) == (4, 2, 1)
    assert (pp2["world"], pp2["pp"], len(pp2["ranks"])) == (2, 2, 2)
    assert tp2["fits"] and pp2["fits"]
    one = tp2["ranks"][0]
    assert one["traffic"]["tp"]["calls"] > 0 and one["traffic"]["dp"]["bytes"] > 0
    assert "pp" not in one["traffic"]
    # tp 2 splits every weight but the norms; pp 2 gives each rank its stage (and the tied head
    # a copy of the embedding on the last).
    full = 4 * count_parameters(resolve_job(load_config(TINY)))
    assert 0.5 * full < tp2["ranks"][0]["tensor_bytes"]["params"] < 0.51 * full
    for rank in pp2["ranks"]:
        assert 0.6 * full < rank["tensor_bytes"]["params"] < 0.7 * full
    assert pp2["ranks"][1]["traffic"]["pp"]["bytes"] > 0
    # zbv puts stages 0 and 3 on pp rank 0: both ranks send and receive hidden states.
    assert (v["world"], v["schedule"], len(v["ranks"])) == (8, "zbv", 2)
    for rank in v["ranks"]:
        assert all(rank["traffic"][axis]["bytes"] > 0 for axis in ("dp", "pp", "tp"))


def test_plan_routes_experts_evenly_over_ep(tmp_path):
    """Fake tensors have no router values: each expert gets n k / E slots, so the all-to-all
    bytes are known: per MoE layer and micro-batch the counts (E int64) and 4 exchanges (there
    and back, forward and backward) of n k rows of C floats."""
    from meshtrain.precision import with_precision
    from meshtrain.simulate import simulate_job

    config = tmp_path / "moe.toml"
    config.write_text(MOE)
    (sim,) = simulate_job(with_precision(resolve_job(load_config(config)), "fp32"))
    tokens, k, width, experts, layers, micro = 2 * 64, 2, 64, 4, 2, 2
    per_layer = experts * 8 + 4 * tokens * k * width * 4
    assert sim.traffic["ep"].bytes == layers * micro * per_layer
    assert sim.traffic["ep"].calls == layers * micro * 5


def test_plan_names_a_bad_size_in_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "meshtrain", "plan", TINY, "--device-memory", "lots"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --device-memory: 'lots'")
    assert "Traceback" not in result.stderr


def test_compare_table_keeps_long_layout_names_whole():
    from types import SimpleNamespace

    from meshtrain.plan import _format_compare

    def plan(name: str) -> SimpleNamespace:
        return SimpleNamespace(name=name, world=8, peak=2**30, traffic=lambda axis: 2**20)

    long = f"{V_FSDP_SP_AC},grad_sync=microbatch"
    header, short_row, long_row = _format_compare([plan("dp=2"), plan(long)], 2**31)
    assert long_row.startswith(long + "  ")
    # the columns line up under the header's
    width = len(long)
    assert header[width + 2 : width + 7] == "ranks"
    assert short_row[width + 2 : width + 7] == long_row[width + 2 : width + 7] == "    8"
