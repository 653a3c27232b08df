"""What moving gradients and weights between two workers costs on this machine: CPU time per MB
of the collectives meshtrain's layouts use, on the process group a run would use (gloo on CPU),
one thread per worker as in a run, against a plain memory copy.

    python bench/collectives.py       # CPU model and matmul peaks first, then ms of CPU per MB

Multiply by the bytes a layout moves per step (`log.comms = true` writes them to metrics.jsonl)
to see what its collectives cost: on CPU every byte is copied through the kernel's loopback
sockets by both workers. On CUDA (NCCL) CPU time is not the cost; the script says so and stops.
"""

from __future__ import annotations

import os
import resource

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from runner import machine_line, measure_machine

SIZES_MB = (1, 25)  # a tensor-parallel all-reduce of bench-small; its embedding's gradient
REPEATS = 10
OPS = ("all_reduce", "broadcast", "send/recv", "memory copy")
"""The memory copy: each worker copies the tensor once, what moving it through shared memory
would cost (one copy in, one out)."""


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread: gloo's included
    return usage.ru_utime + usage.ru_stime


def run_op(op: str, tensor: torch.Tensor, out: torch.Tensor, rank: int) -> None:
    if op == "all_reduce":
        dist.all_reduce(tensor)
    elif op == "broadcast":
        dist.broadcast(tensor, group_src=0)
    elif op == "send/recv":
        if rank == 0:
            dist.send(tensor, dst=1)
        else:
            dist.recv(tensor, src=0)
    else:
        out.copy_(tensor)


def worker(rank: int, port: int, results: dict) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for mb in SIZES_MB:
        tensor = torch.ones(mb * 2**20 // 4)
        out = torch.empty_like(tensor)
        for op in OPS:
            run_op(op, tensor, out, rank)  # warm up: connections, buffers
            dist.barrier()
            start = cpu_s()
            for _ in range(REPEATS):
                run_op(op, tensor, out, rank)
            spent = torch.tensor([cpu_s() - start], dtype=torch.float64)
            dist.all_reduce(spent)  # both workers' CPU
            if rank == 0:
                results[(op, mb)] = float(spent) / REPEATS / mb * 1e3
    dist.destroy_process_group()


def main() -> None:
    if torch.cuda.is_available():
        print("CUDA: NCCL's cost is GPU time, not the CPU time this script measures")
        return
    print(machine_line(measure_machine(1.5)))
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(29400 + os.getpid() % 500, results), nprocs=2)
        print("CPU ms per MB, both workers together (gloo, 2 workers, 1 thread each):")
        for op in OPS:
            cells = ", ".join(f"{mb} MB {results[(op, mb)]:.2f}" for mb in SIZES_MB)
            print(f"  {op:12s} {cells}")


if __name__ == "__main__":
    main()
