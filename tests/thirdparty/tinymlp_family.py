"""A third-party plugin, as a package on PyPI would ship it: a model family (a tiny causal LM in
plain torch, no transformers) and a pipeline schedule, to prove that both need nothing but
`meshtrain.api`.

Token embedding -> blocks of (LayerNorm, up, GELU, down) with a causal running mean of the
hidden states (so positions mix) -> LayerNorm -> untied head.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from meshtrain.api import ModelShape, StagePlan, VocabParallelEmbedding, hookimpl, parse_section


@dataclass(frozen=True, kw_only=True)
class TinyConfig:
    vocab_size: int = 2048
    hidden: int = 32
    width: int = 64
    layers: int = 4


class Block(nn.Module):
    def __init__(self, c: TinyConfig):
        super().__init__()
        self.norm = nn.LayerNorm(c.hidden)
        self.up = nn.Linear(c.hidden, c.width)
        self.down = nn.Linear(c.width, c.hidden)

    def forward(self, h):  # (B, T, C)
        steps = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype)
        mixed = h.cumsum(1) / steps[None, :, None]  # causal mean over earlier positions
        return h + self.down(torch.nn.functional.gelu(self.up(self.norm(mixed))))


class TinyLM(nn.Module):
    def __init__(self, c: TinyConfig):
        super().__init__()
        self.embed = nn.Embedding(c.vocab_size, c.hidden)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.hidden)
        self.head = nn.Linear(c.hidden, c.vocab_size, bias=False)


class TinyStage(nn.Module):
    def __init__(self, model: TinyLM, layers: range, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        if first:
            self.embed = model.embed
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layers})
        if last:
            self.norm, self.head = model.norm, model.head

    def forward(self, x):
        h = self.embed(x) if self.first else x
        for block in self.blocks.values():
            h = block(h)
        return self.head(self.norm(h)) if self.last else h


class TinyFamily:
    model_types = ("tinymlp",)

    def parse_config(self, options, *, name, trust_remote_code, where):
        return parse_section(TinyConfig, dict(options), where)

    def shape(self, c):
        return ModelShape(
            num_layers=c.layers,
            hidden_size=c.hidden,
            num_heads=1,
            num_kv_heads=1,
            head_dim=c.hidden,
            vocab_size=c.vocab_size,
            max_positions=4096,
            tied_embeddings=False,
            tp_divisible={"model.width": c.width, "model.vocab_size": c.vocab_size},
            activations_replicated=3 * c.hidden,
            activations_split=2 * c.width,
            matmul_params=c.layers * 2 * c.hidden * c.width + c.hidden * c.vocab_size,
        )

    def build(self, c):
        return TinyLM(c)

    def split(self, model, layers, *, first, last, sequence_shards):
        assert sequence_shards == 1, "no sequence parallel"
        return TinyStage(model, layers, first, last)

    def plan(self, stage, *, sequence_parallel):
        blocks = tuple(f"blocks.{i}" for i in stage.blocks)
        tp = {}
        if stage.first:
            tp["embed"] = VocabParallelEmbedding()
        for b in blocks:
            tp[f"{b}.up"] = ColwiseParallel()
            tp[f"{b}.down"] = RowwiseParallel()
        if stage.last:
            tp["head"] = ColwiseParallel(
                input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False
            )
        return StagePlan(tp=tp, fsdp_units=blocks, ac_units=blocks)

    def init_parameter(self, name, shape, c, generator):
        if name.endswith("norm.weight"):
            return torch.ones(shape)
        if name.endswith("bias"):
            return torch.zeros(shape)
        return torch.empty(shape).normal_(0.0, 0.05, generator=generator)

    def init_buffers(self, stage):
        pass

    def tied_parameters(self, c):
        return []

    def export(self, model, folder: Path, max_shard_size):
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()},
            str(folder / "model.safetensors"),
        )


@hookimpl
def model_families():
    return {"tinymlp": TinyFamily()}


class OneFOneBVariant:
    """A thin third-party schedule: torch's 1F1B, placed and validated like meshtrain's own."""

    stages_per_rank = 1
    splits_backward = False

    def placement(self, pp_rank, pp):
        return [pp_rank]

    def validate(self, *, pp, grad_acc, num_layers):
        return [] if grad_acc >= pp else [f"train.grad_acc: {grad_acc} < parallel.pp ({pp})"]

    def in_flight(self, pp_rank, pp, grad_acc):
        return min(grad_acc, pp - pp_rank)

    def build(self, stages, n_microbatches, loss_fn):
        from torch.distributed.pipelining import Schedule1F1B

        return Schedule1F1B(
            stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False
        )


@hookimpl
def pipeline_schedules():
    return {"tinymlp_1f1b": OneFOneBVariant()}
