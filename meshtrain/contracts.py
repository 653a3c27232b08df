"""What plugins fill in: the model family, pipeline schedule and data source contracts.

Plugins implement these Protocols with plain classes (no subclassing of core classes) and return
them from the catalog hooks in `meshtrain.hookspecs`. The core only talks to plugins through them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """The numbers the core checks degrees against and estimates cost from."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_positions: int
    tied_embeddings: bool


@runtime_checkable
class ModelFamily(Protocol):
    """A family of decoder-only LMs (e.g. LLaMA). Parameter names are Hugging Face names."""

    def parse_config(
        self, options: Mapping[str, Any], *, name: str | None, trust_remote_code: bool, where: str
    ) -> tuple[Any, list[str]]:
        """Build the family's model config from `[model]` keys (minus family/name/pretrained).

        `name` is a hub id or a local folder with config.json; keys override it. Returns the config
        and problem lines, each starting with `where` + the dotted key. Never hangs on the hub."""

    def shape(self, model_config: Any) -> ModelShape:
        """The model's dimensions."""

    def build(self, model_config: Any) -> nn.Module:
        """The full model. The core calls it under `torch.device("meta")`."""

    def split(self, model: nn.Module, layers: range, *, first: bool, last: bool) -> nn.Module:
        """Keep only `layers` (plus the embedding if `first`, norm and head if `last`) of `model`.

        The stage's forward takes token ids (first) or hidden states (B, T, C) and returns hidden
        states or, on the last stage, logits (B, T, V). Parameter names stay those of `model`."""

    def tp_plan(self, stage: nn.Module, *, sequence_parallel: bool) -> dict[str, Any]:
        """DTensor ParallelStyles keyed by module path, for `parallelize_module` on the tp mesh.

        The head must return vocab-sharded logits (Shard(-1)) for loss parallel."""

    def init_parameter(
        self, name: str, shape: torch.Size, model_config: Any, generator: torch.Generator
    ) -> torch.Tensor:
        """The full initial value of parameter `name` (fp32, CPU), drawn from `generator`."""

    def init_buffers(self, stage: nn.Module) -> None:
        """Recompute non-persistent buffers (e.g. rotary inv_freq) after `to_empty`."""

    def tied_parameters(self, model_config: Any) -> list[tuple[str, str]]:
        """(first-stage name, last-stage name) pairs that share one value, e.g. embed and head."""

    def flops_per_token(self, model_config: Any, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), for MFU."""


@runtime_checkable
class PipelineSchedule(Protocol):
    """A way to run micro-batches through pipeline stages."""

    stages_per_rank: int

    def validate(self, *, pp: int, grad_acc: int) -> list[str]:
        """Problems with these degrees, each naming the keys (e.g. 'train.grad_acc ...')."""

    def build(
        self,
        stages: list[Any],
        n_microbatches: int,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> Any:
        """A `torch.distributed.pipelining` schedule over this rank's stages (in order).

        The schedule must not rescale gradients: the loss is already normalised globally."""


@dataclass(frozen=True, kw_only=True)
class DataContext:
    """What a data source needs to know about the run."""

    seq_len: int
    micro_batch_size: int
    grad_acc: int
    dp: int
    dp_rank: int
    seed: int
    vocab_size: int
    run_dir: Path
    cache_dir: Path

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step over all dp ranks."""
        return self.micro_batch_size * self.grad_acc * self.dp


class DataStream(Protocol):
    """This dp rank's view of a deterministic, resumable stream of global batches."""

    def next_batch(self) -> torch.Tensor:
        """Rows [dp_rank*n, (dp_rank+1)*n) of the next global batch, n = micro_batch_size*grad_acc.

        A LongTensor (n, seq_len + 1): inputs are [:, :-1], labels [:, 1:] (-100 = ignored)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue with exactly the next batch."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned."""


@runtime_checkable
class DataSource(Protocol):
    """A named source of token batches. Its own keys are validated by `config_class`."""

    config_class: type

    def prepare(self, options: Any, ctx: DataContext) -> None:
        """Once per run (per node), before training: check inputs, tokenize and cache, save the
        tokenizer to `ctx.run_dir / "tokenizer"`. Raises UserError naming `data.<key>`."""

    def open(self, options: Any, ctx: DataContext) -> DataStream:
        """This dp rank's stream; cheap, reads what `prepare` cached."""
