"""Mixture-of-experts blocks: routing as transformers does it, experts spread over parallel.ep.

    plan.experts = {"model.layers.3.mlp": ExpertParallel(num_experts=8, top_k=2, ...)}

A family's plan names its MoE blocks (transformers 5 layout: a `gate` router with weight (E, C)
and `experts` holding gate_up_proj (E, 2I, C) [gate | up] and down_proj (E, C, I)); the core
replaces each block's forward with `ExpertParallel`'s, in every layout, so one code path is
proven against transformers and against itself.

Where the ranks come from: ep divides dp. The dp ranks are laid out as (edp, ep), ep innermost,
so the ep ranks of one group are neighbours; each holds num_experts / ep whole experts
(Shard(0) of the expert weights on the "ep" axis) and the groups of one ep coordinate ("edp")
hold the same experts, which FSDP2 shards (parallel.dp_shard) or whose gradients are summed.
world = dp * pp * tp does not change.

Under tp the experts stay whole on each tp rank (split over ep, not tp): the tp ranks share out
the tokens instead. With sequence parallel each routes its own sequence shard; without, the
flattened tokens are cut in tp chunks, and the outputs summed over tp (the one all-reduce a dense
MLP needs too). Expert and router gradients are then partial over tp and summed.

A token's routing never depends on the layout: softmax over the router logits, top-k, the
weights renormalised when norm_topk_prob; no capacity, no token dropped. Tokens go to the ranks
holding their experts and come back with all_to_all_single.

The auxiliary load-balancing loss (output_router_logits) is the Switch loss
E * sum_e f_e * P_e of transformers' `load_balancing_loss_func`, taken per sequence and per MoE
layer and averaged over both: for one sequence and one layer it equals transformers', and no
grouping of sequences into micro-batches or ranks changes it (transformers pools the whole forward
batch and all layers, which depends on the micro-batch). Its gradient enters through the block's
output (no extra pipeline traffic); its value is reported as `aux_loss`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from meshtrain.expert_stats import CLOCK, ExpertStats, counting

EXPERT_WEIGHTS = ("experts.gate_up_proj", "experts.down_proj")
_BALANCED = threading.local()


@contextlib.contextmanager
def balanced_routing() -> Iterator[None]:
    """`meshtrain plan` simulates on fake tensors, which hold no values to route by: every
    expert then gets an equal share of the slots (a perfectly balanced router), so memory and
    all-to-all traffic are those of an even load."""
    _BALANCED.active = True
    try:
        yield
    finally:
        _BALANCED.active = False


def _balanced() -> bool:
    return getattr(_BALANCED, "active", False)


def _even(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def _bincount(values: torch.Tensor, bins: int) -> torch.Tensor:
    """torch.bincount with `bins` bins, or the even split of `values` under balanced_routing."""
    if _balanced():
        return torch.tensor(_even(values.numel(), bins), device=values.device)
    return torch.bincount(values, minlength=bins)


@dataclass
class ExpertParallel:
    """How the core runs one MoE block (see the module docstring)."""

    num_experts: int
    top_k: int
    norm_topk_prob: bool
    layer: int
    """This block's index among the model's MoE blocks (0 .. moe_layers - 1)."""
    moe_layers: int
    aux_coef: float = 0.0
    """router_aux_loss_coef when output_router_logits, else 0 (no auxiliary loss)."""
    sequence_parallel: bool = False

    def ep_dims(self) -> dict[str, int]:
        """Parameters (paths inside the block) split over ep, and along which dim."""
        return dict.fromkeys(EXPERT_WEIGHTS, 0)

    def apply(self, module: nn.Module, mesh: DeviceMesh, sequences: int) -> None:
        """Take over `module`'s forward. `mesh`: the ("ep", "tp") mesh; `sequences`: this dp
        rank's sequences per step (micro_batch_size * grad_acc), to weigh the aux loss."""
        if mesh.size() > 1:
            for path in EXPERT_WEIGHTS:
                _distribute(module, path, mesh, [Shard(0), Replicate()])
            if mesh["tp"].size() > 1:
                _distribute(module, "gate.weight", mesh["tp"], [Replicate()])
        module.moe_stats = None  # made on the first forward, on the device of the tokens
        module.forward = partial(_forward, module, self, mesh, sequences)
        # Called as a module, so FSDP2's hooks on it gather and reduce the expert weights.
        module.experts.forward = partial(_run_experts, module.experts)


def expert_weight_ids(stages: list[nn.Module], plans: list[Any]) -> set[int]:
    """id() of every expert weight (split over ep) in `stages`, from their StagePlans."""
    return {
        id(stage.get_submodule(path).get_parameter(name))
        for stage, plan in zip(stages, plans, strict=True)
        for path, style in plan.experts.items()
        for name in style.ep_dims()
    }


def _distribute(module: nn.Module, path: str, mesh: DeviceMesh, placements: list) -> None:
    owner_path, _, name = path.rpartition(".")
    owner = module.get_submodule(owner_path)
    param = getattr(owner, name)
    value = distribute_tensor(param, mesh, placements, src_data_rank=None)
    owner.register_parameter(name, nn.Parameter(value, param.requires_grad))


def _local(param: torch.Tensor) -> torch.Tensor:
    """The local tensor; gradients from this rank's tokens only are partial over tp."""
    if not isinstance(param, DTensor):
        return param
    names = param.device_mesh.mesh_dim_names
    grads = [Partial() if n == "tp" else p for n, p in zip(names, param.placements, strict=True)]
    return param.to_local(grad_placements=grads)


def _forward(
    module: nn.Module, style: ExpertParallel, mesh: DeviceMesh, sequences: int, h: torch.Tensor
) -> torch.Tensor:
    # h: (B, T, C) whole sequences on every tp rank, or (B, T / tp, C) under sequence parallel
    # (where the norm before it may hand over a Shard(1) DTensor).
    if isinstance(h, DTensor):
        h = h.to_local()
    batch, length, width = h.shape
    tp_mesh = mesh["tp"]
    tp, tp_rank = tp_mesh.size(), tp_mesh.get_local_rank()
    split_tokens = tp > 1 and not style.sequence_parallel
    if split_tokens:  # this rank's share of the gradient of h: partial over tp
        h = DTensor.from_local(h, tp_mesh, [Replicate()], run_check=False)
        h = h.to_local(grad_placements=[Partial()])
    flat = h.reshape(-1, width)  # (N, C)
    rows = torch.arange(flat.shape[0], device=h.device)
    if split_tokens:
        rows = rows.tensor_split(tp)[tp_rank]
    x = flat[rows]  # (n, C) the tokens this rank routes
    logits = F.linear(x, _local(module.gate.weight))  # (n, E)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    weights, chosen = torch.topk(probs, style.top_k, dim=-1)  # (n, k)
    if style.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    out = _experts(module.experts, x, chosen, weights.to(x.dtype), style, mesh["ep"])  # (n, C)
    sequence = rows // length  # (n,) the sequence of each routed token
    full_length = length * (tp if style.sequence_parallel else 1)
    aux = _aux_loss(probs, chosen, sequence, batch, full_length, style, tp_mesh)
    # Counted once per training forward: not the pipeline's shape inference (`uncounted`), not
    # activation checkpointing's recompute (inside backward).
    counted = counting()
    if module.training and counted and torch._C._current_graph_task_id() == -1:
        if module.moe_stats is None:
            module.moe_stats = ExpertStats.zeros(style.num_experts, h.device)
        stats = module.moe_stats
        stats.tokens += _bincount(chosen.flatten(), style.num_experts)
        stats.aux += aux.detach()
    if style.aux_coef and module.training and torch.is_grad_enabled():
        scale = style.aux_coef / (style.moe_layers * sequences)
        out = _AttachLoss.apply(out, aux * scale)
    if split_tokens:  # each rank filled its rows; the sum over tp is the whole output
        whole = torch.zeros_like(flat).index_copy(0, rows, out)
        summed = DTensor.from_local(whole, tp_mesh, [Partial()]).redistribute(
            tp_mesh, [Replicate()]
        )
        out = summed.to_local()
    return out.reshape(batch, length, width)


def _experts(
    experts: nn.Module,
    x: torch.Tensor,
    chosen: torch.Tensor,
    weights: torch.Tensor,
    style: ExpertParallel,
    ep_mesh: DeviceMesh,
) -> torch.Tensor:
    """sum_k weights[:, k] * expert_{chosen[:, k]}(x), the experts wherever they live."""
    n, k = chosen.shape
    slots = chosen.flatten()  # (n k,)
    order = torch.argsort(slots, stable=True)  # slots grouped by expert, as transformers loops
    token = order // k
    counts = _bincount(slots, style.num_experts)  # (E,)
    sent = x[token]  # (n k, C)
    ep = ep_mesh.size()
    if ep == 1:
        done = experts(sent, _even(n * k, style.num_experts) if _balanced() else counts)
    else:
        done = _exchange(experts, sent, counts, ep_mesh)
    done = done * weights.flatten()[order].unsqueeze(-1)  # bf16 under autocast, as x may not be
    return torch.zeros_like(x).index_add(0, token, done.to(x.dtype))


def _exchange(
    experts: nn.Module, sent: torch.Tensor, counts: torch.Tensor, ep_mesh: DeviceMesh
) -> torch.Tensor:
    """Send each slot to the ep rank holding its expert, run the local experts, send back."""
    ep, group = ep_mesh.size(), ep_mesh.get_group()
    per_rank = counts.view(ep, -1)  # (ep, E / ep): slots for each rank's experts
    start = time.perf_counter()
    received = torch.empty_like(per_rank)
    dist.all_to_all_single(received, per_rank, group=group)  # [source rank, local expert]
    CLOCK.seconds += time.perf_counter() - start
    local_experts = received.shape[1]
    if _balanced():  # every rank sends every rank its experts' even share
        mine = _even(sent.shape[0], counts.numel())[:local_experts]
        send_sizes, recv_sizes = [sum(mine)] * ep, [sum(mine)] * ep
        per_source, local_counts = mine * ep, [c * ep for c in mine]
    else:
        send_sizes = per_rank.sum(1).tolist()
        recv_sizes = received.sum(1).tolist()
        per_source, local_counts = received.flatten(), received.sum(0)
    arrived = _AllToAll.apply(sent, recv_sizes, send_sizes, group)
    # Rows arrive grouped by source rank, then expert: regroup by expert for the matmuls.
    expert_of_row = torch.arange(local_experts, device=sent.device).repeat(ep)
    expert_of_row = expert_of_row.repeat_interleave(
        torch.as_tensor(per_source, device=sent.device), output_size=sum(recv_sizes)
    )
    by_expert = torch.argsort(expert_of_row, stable=True)
    done = experts(arrived[by_expert], local_counts)
    back = done[torch.argsort(by_expert)]  # source-rank order again
    return _AllToAll.apply(back, send_sizes, recv_sizes, group)


def _run_experts(
    experts: nn.Module, rows: torch.Tensor, counts: torch.Tensor | list[int]
) -> torch.Tensor:
    """Each local expert on its rows (grouped by expert, `counts` each). An expert without rows
    still runs, on none, so every rank has a gradient for its expert weights."""
    gate_up, down = _local(experts.gate_up_proj), _local(experts.down_proj)
    outputs = []
    sizes = counts if isinstance(counts, list) else counts.tolist()
    for index, part in enumerate(rows.split(sizes)):
        gate, up = F.linear(part, gate_up[index]).chunk(2, dim=-1)
        outputs.append(F.linear(experts.act_fn(gate) * up, down[index]))
    return torch.cat(outputs)


def _aux_loss(
    probs: torch.Tensor,
    chosen: torch.Tensor,
    sequence: torch.Tensor,
    batch: int,
    length: int,
    style: ExpertParallel,
    tp_mesh: DeviceMesh,
) -> torch.Tensor:
    """Sum over this rank's sequences of E * sum_e f_e P_e (the tp ranks' shares add up to it):
    f_e, the share of the sequence's top-k slots routed to e (counted over the whole sequence),
    P_e its mean router probability."""
    num_experts = style.num_experts
    slots = sequence.repeat_interleave(style.top_k) * num_experts + chosen.flatten()
    counts = _bincount(slots, batch * num_experts).view(batch, num_experts)
    counts = counts.to(probs.dtype)
    if tp_mesh.size() > 1:  # each tp rank routed part of every sequence
        dist.all_reduce(counts, group=tp_mesh.get_group())
    prob_sums = probs.new_zeros(batch, num_experts).index_add(0, sequence, probs)
    return num_experts * (counts * prob_sums).sum() / (length * length)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of rows, reversed in backward; both timed (metric all_to_all_s)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, out_sizes: list, in_sizes: list, group: Any) -> Any:
        ctx.sizes, ctx.group = (out_sizes, in_sizes), group
        return _all_to_all(x, out_sizes, in_sizes, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        out_sizes, in_sizes = ctx.sizes
        return _all_to_all(grad, in_sizes, out_sizes, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, out_sizes: list, in_sizes: list, group: Any) -> torch.Tensor:
    out = x.new_empty((sum(out_sizes), *x.shape[1:]))
    start = time.perf_counter()
    dist.all_to_all_single(out, x.contiguous(), out_sizes, in_sizes, group=group)
    CLOCK.seconds += time.perf_counter() - start
    return out


class _AttachLoss(torch.autograd.Function):
    """Returns `out` unchanged; in backward, gives `loss` the gradient 1, as if it were added to
    the final loss (MoE aux losses reach the router this way without travelling the pipeline)."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(loss)
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (loss,) = ctx.saved_tensors
        return grad, torch.ones_like(loss)
