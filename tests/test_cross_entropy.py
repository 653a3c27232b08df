"""The chunked cross-entropy (meshtrain.cross_entropy) gives F.cross_entropy's loss and gradients
on the whole logits: even and uneven vocabulary splits (one leaving a rank no columns), ignored
labels, bf16 logits, replicated logits, logits of another placement (gathered whole), several
chunks per rank. A leaf's logits are left as they were."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.spawn import spawn_ranks

pytestmark = pytest.mark.dist

WORLD = 2
CASES = ("even", "uneven", "no-columns", "bf16", "replicated", "batch-sharded")
VOCAB = {"uneven": 97, "no-columns": 1}
SCALE = 0.37


def test_fused_loss_is_cross_entropy_of_the_whole_logits(tmp_path):
    spawn_ranks(_worker, tmp_path, WORLD)
    for rank in range(WORLD):
        found = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for case in CASES:
            loss_error, grad_error, fused = found[case]
            assert fused, case  # every placement goes through the chunked function
            assert loss_error < 1e-6, (case, loss_error)
            assert grad_error < (1e-2 if case == "bf16" else 1e-6), (case, grad_error)


def _worker(rank: int, port: int, out: str, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from meshtrain import cross_entropy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    fused_calls = []
    original = cross_entropy._CrossEntropy.apply
    cross_entropy._CrossEntropy.apply = lambda *a: fused_calls.append(1) or original(*a)
    cross_entropy.CHUNK_BYTES = 3 * 48 * 4  # chunks of 3 rows of the 48 or 49 local columns
    found = {}
    for case in CASES:
        vocab = VOCAB.get(case, 96)
        generator = torch.Generator().manual_seed(0)  # the same logits on both ranks
        whole = 4 * torch.randn(2, 5, vocab, generator=generator)
        labels = torch.randint(0, vocab, (2, 5), generator=generator)
        labels[0, 1] = labels[1, 4] = -100
        dtype = torch.bfloat16 if case == "bf16" else torch.float32
        whole = whole.to(dtype)
        placement = {"replicated": Replicate(), "batch-sharded": Shard(0)}.get(case, Shard(2))
        logits = distribute_tensor(whole, mesh, [placement]).requires_grad_()
        before = logits.full_tensor().clone()
        calls = len(fused_calls)
        loss = cross_entropy.token_cross_entropy(logits, labels)
        (loss * SCALE).backward()  # as grad_acc scales it
        reference = whole.detach().clone().requires_grad_()
        expected = F.cross_entropy(
            reference.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        (expected * SCALE).backward()
        grad = logits.grad.full_tensor()
        assert torch.equal(logits.full_tensor(), before), case  # a leaf is not overwritten
        found[case] = (
            abs(float(loss) - float(expected)) / max(abs(float(expected)), 1.0),
            float((grad.float() - reference.grad.float()).abs().max()),
            len(fused_calls) > calls,
        )
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(found))
    dist.barrier()  # the peer is done reading too: closing earlier aborts its gloo thread
    dist.destroy_process_group()
