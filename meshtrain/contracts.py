"""What plugins fill in: the model family, pipeline schedule and data source contracts.

Plugins implement these Protocols with plain classes (no subclassing of core classes) and return
them from the catalog hooks in `meshtrain.hookspecs`. The core only talks to plugins through them.

A family describes its model as data: `ModelShape` (the numbers degrees and costs are checked
against) and, per pipeline stage, a `StagePlan` (how the core parallelises that stage). A schedule
says which stages each pipeline rank holds (`placement`). The core applies both in one place
(`meshtrain.parallelize`), and `meshtrain check` reads the same objects.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

IGNORE_INDEX = -100
"""A label that takes no part in the loss. Never an input id."""


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """The numbers the core checks degrees against and estimates cost from."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    """Width of one attention head (not always hidden_size / num_heads)."""
    vocab_size: int
    max_positions: int
    tied_embeddings: bool
    tp_divisible: Mapping[str, int] = field(default_factory=dict)
    """Sizes parallel.tp must divide, by the config key that sets them (e.g.
    model.num_attention_heads, model.vocab_size): whatever the family's tp plan splits."""
    tp_divisible_or_multiple: Mapping[str, int] = field(default_factory=dict)
    """Sizes parallel.tp must divide or be a multiple of (e.g. model.num_key_value_heads when the
    plan replicates key/value heads on tp ranks that have fewer than one each)."""
    activations_replicated: float = 0.0
    """Floats per token per layer kept for backward that tp does not split (the residual stream
    around the norms; split over tp under sequence parallel)."""
    activations_split: float = 0.0
    """Floats per token per layer kept for backward that tp splits (projections, MLP)."""
    matmul_params: int = 0
    """Parameters that take part in a matmul per token (layers and head, not the embedding
    lookup; of a mixture of experts, only the top-k experts a token uses); the core counts 6
    FLOPs each per trained token, plus attention scores."""
    num_experts: int = 0
    """Experts per MoE block; 0 for a dense model."""
    moe_layers: int = 0
    """How many blocks are MoE blocks (StagePlan.experts)."""
    ep_divisible: Mapping[str, int] = field(default_factory=dict)
    """Sizes parallel.ep must divide, by config key (e.g. model.num_experts)."""


@dataclass(frozen=True)
class StackedKeys:
    """A parameter kept in the checkpoint as several tensors: its entry i along dim 0 is the
    concatenation (along dim 0) of the tensors `keys[i]`. Experts fused as (E, 2I, C) in the model
    come from per-expert gate and up projections this way."""

    keys: tuple[tuple[str, ...], ...]


@dataclass(frozen=True, kw_only=True)
class StagePlan:
    """How the core parallelises one pipeline stage, keyed by module path inside the stage.

    The core applies it in the order tensor parallel -> experts -> activation checkpointing ->
    FSDP2."""

    tp: Mapping[str, Any] = field(default_factory=dict)
    """DTensor ParallelStyles for `parallelize_module` on the tp mesh. The head must return
    vocab-sharded logits (Shard(-1)) for loss parallel."""
    fsdp_units: tuple[str, ...] = ()
    """Modules sharded as their own FSDP2 unit, in execution order (usually the embedding, each
    block and the head: a unit is gathered only around its own forward and backward, and its
    gradient reduced right after its backward); the stage itself is always the root unit
    holding the rest, which stays gathered from its forward through the stage's backward."""
    keep_gathered: tuple[str, ...] = ()
    """Those of `fsdp_units` whose backward follows their forward with little memory allocated
    between: the head (only the loss comes between), and the last block of a stage that passes
    its output on (only the wait for the next stage's gradient, which in 1F1B comes after this
    stage's next forward, where the block is gathered anyway). Under
    parallel.reshard_after_forward = "auto", FSDP2 keeps their weights gathered from forward to
    backward instead of freeing them and gathering them again."""
    ac_units: tuple[str, ...] = ()
    """Modules recomputed in backward under train.activation_checkpointing, and compiled each on
    its own under train.compile (usually each block)."""
    hf_keys: Mapping[str, str | StackedKeys] = field(default_factory=dict)
    """Stage parameter name -> key(s) in the family's Hugging Face checkpoint, where they
    differ."""
    experts: Mapping[str, Any] = field(default_factory=dict)
    """MoE blocks: module path -> `meshtrain.api.ExpertParallel`, which the core applies in
    every layout (after tensor parallel): routing, experts split over parallel.ep, the
    all-to-all, the aux loss and the expert load metrics (meshtrain.experts)."""

    def __post_init__(self) -> None:
        stray = [path for path in self.keep_gathered if path not in self.fsdp_units]
        if stray:  # a family's mistake, which would otherwise cost only speed, silently
            raise ValueError(f"StagePlan.keep_gathered names modules not in fsdp_units: {stray}")


@dataclass(frozen=True, kw_only=True)
class ParamSpec:
    """One parameter of a pipeline stage as `split` cuts it and `plan` splits it, declared from
    the model config alone (`ModelFamily.stage_parameters`), so that `meshtrain check` counts
    each rank's parameters without torch or the model's code."""

    name: str
    """Its name in the stage. A tied copy (`tied_parameters`) is listed under its own name too:
    the core counts a tied pair once on a rank that holds both."""
    shape: tuple[int, ...]
    """The whole parameter's shape, before any split."""
    tp_dim: int | None = None
    """The dim the stage's tp plan splits over parallel.tp (for the tp it was declared for), or
    None where every tp rank holds the whole parameter."""
    expert: bool = False
    """An expert weight of a `StagePlan.experts` block: split over parallel.ep along dim 0 (not
    over tp), and sharded by FSDP2 over the dp ranks holding the same experts."""
    fsdp_unit: str = ""
    """The `StagePlan.fsdp_units` module holding it; "" for the stage's root unit."""


@runtime_checkable
class ModelFamily(Protocol):
    """A family of decoder-only LMs. Parameter names of the stages are those of `build`'s model;
    checkpoints (DCP) use them, Hugging Face files go through `StagePlan.hf_keys`."""

    model_types: tuple[str, ...]
    """Hugging Face `model_type`s this family trains (config.json); may be empty."""

    def parse_config(
        self, options: Mapping[str, Any], *, name: str | None, trust_remote_code: bool, where: str
    ) -> tuple[Any, list[str]]:
        """Build the family's model config from `[model]` keys (minus family/name/pretrained).

        `name` is a hub id or a local folder with config.json; keys override it. Returns the config
        and problem lines, each starting with `where` + the dotted key. Never hangs on the hub."""

    def shape(self, model_config: Any) -> ModelShape:
        """The model's dimensions and per-token costs."""

    def build(self, model_config: Any) -> Any:
        """The full model (an nn.Module). The core calls it under `torch.device("meta")`."""

    def split(
        self, model: Any, layers: range, *, first: bool, last: bool, sequence_shards: int
    ) -> Any:
        """A stage module with only `layers` (plus the embedding if `first`, norm and head if
        `last`) of `model`; parameter names stay those of `model`.

        Its forward takes token ids (B, T) on the first stage or hidden states on the others and
        returns hidden states or, on the last stage, logits (B, T, V). With `sequence_shards`
        = n > 1 (sequence parallel), hidden states between stages are (B, T / n, C) shards of the
        sequence; token ids are always whole."""

    def plan(self, stage: Any, *, sequence_parallel: bool) -> StagePlan:
        """How to parallelise `stage` (see StagePlan)."""

    def init_parameter(self, name: str, shape: Any, model_config: Any, generator: Any) -> Any:
        """The full initial value of parameter `name` (fp32 tensor on CPU) from `generator`."""

    def init_buffers(self, stage: Any) -> None:
        """Recompute non-persistent buffers (e.g. rotary inv_freq) after `to_empty`."""

    def tied_parameters(self, model_config: Any) -> list[tuple[str, str]]:
        """(source, copy) parameter names that share one value, e.g. embedding and head. The
        core keeps copies equal wherever the schedule places them."""

    def export(self, model: Any, folder: Path, max_shard_size: str) -> None:
        """Write the whole model (`build`'s, with trained weights) as a Hugging Face folder."""

    # Optional, so that `meshtrain check` imports neither torch nor the model's code. Without
    # `stage_parameters` check builds the model on the meta device and reads its StagePlans
    # (exact too, but seconds of imports); without `declared_config` it calls parse_config.
    #
    #   def stage_parameters(self, model_config, layers: range, *, first: bool, last: bool,
    #                        tp: int, sequence_parallel: bool) -> list[ParamSpec]:
    #       """The parameters of the stage `split` would cut (same arguments), each as
    #       `plan(stage, sequence_parallel=...)` splits it at parallel.tp = `tp`. Takes
    #       parse_config's config and declared_config's alike."""
    #
    #   def declared_config(self, options, *, name: str | None, trust_remote_code: bool,
    #                       where: str) -> tuple[Any, list[str]] | None:
    #       """What parse_config returns (the same problem lines), found without importing the
    #       model's code, or None where the family cannot be sure parse_config would agree (the
    #       core then calls parse_config). Its config may be a plain object: the core passes it
    #       only to `shape`, `stage_parameters` and `tied_parameters`, never to `build`. The core
    #       asks for it only where `stage_parameters` is declared as well."""
    #
    # Optional, for startup time (a schedule or a data source may declare it too):
    #
    #   worker_imports: tuple[str, ...]
    #       """Modules its code imports in the workers (e.g. the transformers model's module):
    #       the local launcher imports them once in the process it forks CPU workers from,
    #       instead of every worker importing them again."""


@runtime_checkable
class PipelineSchedule(Protocol):
    """A way to run micro-batches through pipeline stages."""

    stages_per_rank: int
    splits_backward: bool
    """Backward runs as separate input- and weight-gradient passes (zero bubble): FSDP2 must keep
    the gathered weights from forward until the weight pass."""
    # Optional: `evaluates: bool` -- the built schedule's `eval()` runs forward only (torch's
    # single-stage and loop schedules). Without it, [eval] walks the stages in order with the
    # core's own forward sweep (meshtrain.pipeline.forward_sweep).
    # Optional: `actions(pp_rank, pp, n_microbatches) -> [(kind, stage, micro-batch)]` -- the
    # compute actions the schedule runs on `pp_rank`, in order (kind F, B, I, W or REDUCE_GRAD),
    # which `meshtrain plan` replays. Without it, plan refuses pp > 1.

    def placement(self, pp_rank: int, pp: int) -> list[int]:
        """The stage ids (0 .. pp * stages_per_rank - 1) pipeline rank `pp_rank` holds, in the
        order `build` receives them: loop style p, p + pp, ...; V style p, 2 * pp - 1 - p."""

    def validate(self, *, pp: int, grad_acc: int, num_layers: int) -> list[str]:
        """Problems with these degrees, each naming the keys (e.g. 'train.grad_acc ...')."""

    def in_flight(self, pp_rank: int, pp: int, grad_acc: int) -> int:
        """At most how many micro-batches' activations pipeline rank `pp_rank` keeps at once
        (for the memory estimate of `meshtrain check`)."""

    def build(
        self,
        stages: list[Any],
        n_microbatches: int,
        loss_fn: Callable[[Any, Any], Any],
    ) -> Any:
        """A `torch.distributed.pipelining` schedule over this rank's stages (placement order).

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


class Batch(NamedTuple):
    """This dp rank's rows of one global batch: token ids and the ids to predict."""

    inputs: Any
    """LongTensor (n, seq_len) of token ids; never IGNORE_INDEX."""
    labels: Any
    """LongTensor (n, seq_len): the next token of each input, or IGNORE_INDEX (no loss)."""


class DataStream(Protocol):
    """This dp rank's view of a deterministic, resumable stream of global batches."""

    def next_batch(self) -> Batch:
        """Rows [dp_rank*n, (dp_rank+1)*n) of the next global batch, n = micro_batch_size*grad_acc.

        A third-party stream may still return one LongTensor (n, seq_len + 1); the core reads it
        as inputs [:, :-1] and labels [:, 1:]."""

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

    # Optional, for `[eval]`:
    #
    #   def open_eval(self, options, ctx: DataContext) -> DataStream:
    #       """This dp rank's view of the held-out stream: data `open`'s stream never yields, in
    #       global batches formed as in `open` (so the layout never changes them), the same
    #       from its start every time it is opened. `prepare` readies it."""
