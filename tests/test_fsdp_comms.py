"""FSDP2's gloo collectives (meshtrain.fsdp_comms) give exactly what gloo's own all-gather and
reduce-scatter give, in place, and free the reduce-scatter input they are done with: at dp 2
(the reduce-scatter receives into its output) and at 3 (into a buffer of its own)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.spawn import spawn_ranks

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("world", [2, 3])
def test_gloo_comms_match_gloo_collectives(tmp_path, world):
    spawn_ranks(_worker, tmp_path, world)
    for rank in range(world):
        found = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert found == {
            "gather_equal": True,
            "gather_in_place": True,
            "sum_equal": True,
            "avg_equal": True,
            "input_freed": True,
        }


def _worker(rank: int, port: int, out: str, world: int) -> None:
    from meshtrain.fsdp_comms import BroadcastAllGather, ExchangeReduceScatter

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.group.WORLD
    generator = torch.Generator().manual_seed(rank)
    found = {}

    # All-gather, as FSDP2 calls it: the input is this rank's slice of the output.
    shard = torch.randn(1000, generator=generator)
    expected = torch.empty(world * 1000)
    dist.all_gather_into_tensor(expected, shard)
    output = torch.empty(world * 1000)
    mine = output[rank * 1000 : (rank + 1) * 1000]
    mine.copy_(shard)
    pointer = mine.data_ptr()
    BroadcastAllGather()(output, mine, group)
    found["gather_equal"] = torch.equal(output, expected)
    found["gather_in_place"] = output[rank * 1000 :].data_ptr() == pointer

    # Reduce-scatter, summed and averaged (what FSDP2 asks of gloo in fp32).
    full = torch.randn(world * 1000, generator=generator)
    for op, key in ((dist.ReduceOp.SUM, "sum_equal"), (dist.ReduceOp.AVG, "avg_equal")):
        expected = torch.empty(1000)
        dist.reduce_scatter_tensor(expected, full.clone(), op=op)
        got, given = torch.empty(1000), full.clone()
        ExchangeReduceScatter()(got, given, group, op)
        found[key] = torch.allclose(got, expected, rtol=0, atol=1e-6)
        found["input_freed"] = given.untyped_storage().nbytes() == 0
    Path(out, f"rank{rank}.json").write_text(json.dumps(found))
    dist.barrier()  # the peer is done reading too: closing earlier aborts its gloo thread
    dist.destroy_process_group()
