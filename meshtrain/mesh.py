"""The process group and the DeviceMesh: ("edp", "ep", "pp", "tp"), tp innermost, with "dp" the
flattened ("edp", "ep").

Expert parallelism takes its ranks from dp: dp = edp * ep, the ep ranks of one group neighbours
in dp order; "ep" spreads experts, "edp" joins the ranks holding the same experts. Size-1 axes
stay in the mesh so no code branches on their absence. gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from meshtrain.config import Config
from meshtrain.errors import UserError

MESH_AXES = ("edp", "ep", "pp", "tp")


@dataclass
class Mesh:
    """This rank's place in the world."""

    mesh: DeviceMesh
    """("edp", "ep", "pp", "tp")."""
    dp_mesh: DeviceMesh
    """The flattened ("edp", "ep") axis."""
    device: torch.device
    backend: str
    """The run's collectives: "gloo" or "nccl" (a plan simulates either on a fake group)."""
    rank: int
    world: int
    dp_rank: int
    pp_rank: int
    tp_rank: int

    def axis(self, name: str) -> DeviceMesh:
        """The 1-D mesh of `name`: dp, pp, tp, ep or edp."""
        return self.dp_mesh if name == "dp" else self.mesh[name]

    def size(self, axis: str) -> int:
        return self.axis(axis).size()

    def group(self, axis: str) -> dist.ProcessGroup:
        return self.axis(axis).get_group()


def init_mesh(config: Config, device_type: str, backend: str | None = None) -> Mesh:
    """Join (or create, for one process) the process group and build the mesh. `backend`: the
    run's, where it is not the one `device_type` implies (a plan simulating a CUDA run)."""
    par = config.parallel
    backend = backend or ("nccl" if device_type == "cuda" else "gloo")
    timeout = timedelta(seconds=config.run.timeout_s)
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:  # a world of one, in-process: same code path, no launcher
            dist.init_process_group(
                backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
    if dist.get_world_size() != config.world_size:
        raise UserError(
            f"{config.path}: parallel.dp * parallel.pp * parallel.tp = "
            f"{config.world_size} but the world has {dist.get_world_size()} processes"
        )
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device(device_type)
    shape = (par.dp // par.ep, par.ep, par.pp, par.tp)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_AXES)
    dp_mesh = mesh["edp", "ep"]._flatten("dp")
    coords = {axis: mesh.get_local_rank(axis) for axis in ("pp", "tp")}
    coords["dp"] = dp_mesh.get_local_rank()
    return Mesh(
        mesh=mesh,
        dp_mesh=dp_mesh,
        device=device,
        backend=backend,
        rank=dist.get_rank(),
        world=dist.get_world_size(),
        dp_rank=coords["dp"],
        pp_rank=coords["pp"],
        tp_rank=coords["tp"],
    )


def pp_pair_groups(
    mesh: Mesh, pairs: list[tuple[int, int]]
) -> dict[tuple[int, int], dist.ProcessGroup]:
    """For each pair of pp ranks, the group of the two ranks with this rank's dp and tp
    coordinates (e.g. the ranks holding a tied embedding and head). Every rank creates every
    group, in the same order, as torch.distributed requires."""
    edp, ep, pp, tp = mesh.mesh.mesh.shape
    ranks = mesh.mesh.mesh.reshape(edp * ep, pp, tp)  # (dp, pp, tp) tensor of global ranks
    mine = {}
    for a, b in pairs:
        for d in range(ranks.shape[0]):
            for t in range(ranks.shape[2]):
                members = [int(ranks[d, a, t]), int(ranks[d, b, t])]
                group = dist.new_group(members)
                if mesh.rank in members:
                    mine[(a, b)] = group
    return mine


def close_mesh() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
