"""The TOML config: tables map to frozen dataclasses; every problem is reported at once.

    cfg = load_config(Path("configs/tiny_cpu.toml"), ["parallel.tp=2"])

Each problem is one line naming the file and the dotted key, e.g.
`configs/run.toml: parallel.tpp: unknown key (did you mean parallel.tp?)`.
Plugin sections (`[model]` minus the core keys, `[data]` minus `source`) are checked by the plugin
(see `meshtrain.job`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshtrain.errors import ConfigError, suggest
from meshtrain.tables import apply_override, parse_section, read_with_bases


def _opt(default: Any, *, choices: tuple = (), min: float | None = None) -> Any:
    return field(default=default, metadata={"choices": choices, "min": min})


@dataclass(frozen=True, kw_only=True)
class RunSection:
    dir: str = ""
    """Output folder for metrics, logs, checkpoints; default runs/<config stem>."""
    device: str = _opt("auto", choices=("auto", "cpu", "cuda"))
    """auto = cuda when available, else cpu (gloo)."""
    max_restarts: int = _opt(0, min=0)
    """How often the elastic launcher restarts the workers after a failure."""
    timeout_s: float = _opt(300.0, min=1)
    """Collective timeout: a rank that waits longer than this fails instead of hanging."""
    malloc: str = _opt("auto", choices=("auto", "tcmalloc", "system"))
    """The CPU workers' malloc: tcmalloc reuses freed pages (faster), system (glibc) returns
    them at once (lowest peak memory) and maps large blocks in transparent huge pages; auto =
    tcmalloc where installed, else system. CUDA runs keep the system's unless "tcmalloc" is
    named (meshtrain/malloc.py)."""


@dataclass(frozen=True, kw_only=True)
class ParallelSection:
    dp: int = _opt(1, min=1)
    """Data-parallel degree."""
    pp: int = _opt(1, min=1)
    """Pipeline-parallel degree (pipeline ranks)."""
    tp: int = _opt(1, min=1)
    """Tensor-parallel degree."""
    ep: int = _opt(1, min=1)
    """Expert-parallel degree: each MoE block's experts are spread over ep ranks, taken from dp
    (ep divides dp; world = dp * pp * tp is unchanged)."""
    dp_shard: bool = False
    """Shard parameters, gradients and optimizer state over dp (FSDP2) instead of replicating."""
    sequence_parallel: bool = False
    """Shard norms and residual activations over the sequence on the tp axis."""
    reshard_after_forward: str = _opt("auto", choices=("auto", "always", "never"))
    """FSDP2 units after their forward: free the gathered weights and gather again in backward
    (always), or keep them until backward (never: less traffic, a stage's weights in memory).
    auto = never for schedules that split backward (zero bubble), else always but for the units
    the family keeps (StagePlan.keep_gathered: the head, a stage's last block), whose backward
    follows their forward with little memory allocated between."""
    grad_sync: str = _opt("step", choices=("step", "microbatch"))
    """When FSDP2 reduce-scatters gradients: once per step, after the last micro-batch (step:
    fewest collectives; under pp each stage keeps its gathered weights and full-size gradients
    from its first backward to the end of the step), or after every micro-batch's backward
    (microbatch: only sharded gradients and the unit in use gathered; one more all-gather and
    reduce-scatter per unit and micro-batch). Only under FSDP2; not for schedules that split
    backward."""

    @property
    def fsdp(self) -> bool:
        """Parameters are sharded over dp (FSDP2): dp_shard with more than one dp rank."""
        return self.dp_shard and self.dp > 1


@dataclass(frozen=True, kw_only=True)
class PipelineSection:
    schedule: str = "1f1b"
    """Name of a pipeline schedule from a plugin (`meshtrain plugins` lists them)."""


@dataclass(frozen=True, kw_only=True)
class ModelSection:
    family: str = "auto"
    """Name of a model family from a plugin; auto = the family that trains model.name's
    model_type (config.json)."""
    name: str = ""
    """Hub id or local folder with config.json; the family's keys below override it."""
    pretrained: bool = False
    """Load the weights from `name` (safetensors) instead of initialising from train.seed."""
    trust_remote_code: bool = False
    """Allow code from the model's folder or hub repo to run (off unless set)."""
    options: dict = field(default_factory=dict)
    """The family's own keys (everything else in [model]); checked by the family."""


@dataclass(frozen=True, kw_only=True)
class DataSection:
    source: str = "offline"
    """Name of a data source from a plugin; `offline` needs no network."""
    options: dict = field(default_factory=dict)
    """The source's own keys (everything else in [data]); checked by the source."""


@dataclass(frozen=True, kw_only=True)
class TrainSection:
    steps: int = _opt(20, min=1)
    """Optimizer steps."""
    grad_acc: int = _opt(1, min=1)
    """Micro-batches per step (also the pipeline's micro-batches)."""
    micro_batch_size: int = _opt(1, min=1)
    """Sequences per micro-batch per dp rank."""
    seq_len: int = _opt(128, min=1)
    """Tokens per sequence."""
    seed: int = _opt(0, min=0)
    """Seed for initial weights and data order."""
    lr: float = _opt(3e-4, min=0)
    """Peak learning rate (AdamW)."""
    warmup_steps: int = _opt(0, min=0)
    """Linear warmup steps, then cosine decay to lr * min_lr_ratio."""
    min_lr_ratio: float = _opt(0.1, min=0)
    """Final learning rate as a fraction of lr."""
    weight_decay: float = _opt(0.0, min=0)
    """AdamW weight decay, on matrices only (not norms)."""
    grad_clip: float = _opt(1.0, min=0)
    """Clip the global gradient norm to this; 0 = off."""
    precision: str = _opt("auto", choices=("auto", "fp32", "bf16"))
    """auto (bf16 where this device computes it faster, else fp32: meshtrain/precision.py), fp32,
    or bf16 compute with fp32 master weights (FSDP2 mixed precision under
    parallel.dp_shard, autocast otherwise)."""
    compile: bool = False
    """torch.compile each unit the family's plan names (its blocks): inductor with the system C
    compiler on CPU, Triton on CUDA. The first step pays the compilation (compile_s)."""
    activation_checkpointing: str = _opt("none", choices=("none", "full", "selective"))
    """Recompute activations in backward for the units the family's plan names: none, full
    (keep only each unit's input) or selective (keep matmul and attention outputs)."""


@dataclass(frozen=True, kw_only=True)
class CheckpointSection:
    every: int = _opt(0, min=0)
    """Save every N steps (and at the end); 0 = never."""
    keep: int = _opt(2, min=1)
    """Keep the newest K checkpoints."""
    resume: str = "auto"
    """auto = newest complete checkpoint in <run.dir>/checkpoints, never, or a path."""


@dataclass(frozen=True, kw_only=True)
class EvalSection:
    every: int = _opt(0, min=0)
    """Evaluate on the held-out data every N steps; 0 = only where at_end / at_checkpoint ask."""
    steps: int = _opt(4, min=1)
    """Global batches per evaluation: the first `steps` of the held-out stream, every time."""
    at_end: bool = False
    """Also evaluate after the last step."""
    at_checkpoint: bool = False
    """Also evaluate at every checkpoint save."""

    @property
    def enabled(self) -> bool:
        return bool(self.every) or self.at_end or self.at_checkpoint


@dataclass(frozen=True, kw_only=True)
class LogSection:
    every: int = _opt(1, min=1)
    """Print a line (or update the progress bar) every N steps."""
    tensorboard: bool = False
    """Also write TensorBoard event files to <run.dir>/tensorboard."""
    comms: bool = False
    """Count each step's collectives: metrics comm_bytes and comm_calls by axis and pp rank
    (what `meshtrain plan` predicts). Costs some Python per op."""
    comm_time: bool = False
    """Time each step's collectives with torch's profiler: metric comm_s, seconds per kind
    (all_reduce, all_gather, broadcast, send, ...) by pp rank, the mean over its ranks. On gloo
    that is the time spent in or waiting at them; on NCCL only their launch."""


@dataclass(frozen=True, kw_only=True)
class PluginsSection:
    disable: list = field(default_factory=list)
    """Plugin names not to load."""


SECTIONS: dict[str, type] = {
    "run": RunSection,
    "parallel": ParallelSection,
    "pipeline": PipelineSection,
    "model": ModelSection,
    "data": DataSection,
    "train": TrainSection,
    "checkpoint": CheckpointSection,
    "eval": EvalSection,
    "log": LogSection,
    "plugins": PluginsSection,
}
OPEN_SECTIONS = {"model", "data"}  # their unknown keys go to `options`, checked by the plugin


@dataclass(frozen=True, kw_only=True)
class Config:
    path: Path
    """The TOML file the config came from."""
    raw: dict
    """The merged tables after `base` and overrides (saved with checkpoints)."""
    run: RunSection
    parallel: ParallelSection
    pipeline: PipelineSection
    model: ModelSection
    data: DataSection
    train: TrainSection
    checkpoint: CheckpointSection
    eval: EvalSection
    log: LogSection
    plugins: PluginsSection

    @property
    def world_size(self) -> int:
        return self.parallel.dp * self.parallel.pp * self.parallel.tp

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) if self.run.dir else Path("runs") / self.path.stem


def load_config(path: Path, overrides: list[str] = ()) -> Config:
    """Read `path` (following `base`), apply `--set` overrides, and check every core section."""
    path = Path(path)
    raw = read_with_bases(path, [])
    problems: list[str] = []
    for item in overrides:
        apply_override(raw, item, path, problems)
    return config_from_raw(path, raw, problems)


def config_from_raw(path: Path, raw: dict, problems: list[str] = ()) -> Config:
    """Check already merged tables (as saved in `Config.raw`) and build the Config."""
    path, problems = Path(path), list(problems)
    sections: dict[str, Any] = {}
    for table, value in raw.items():
        if table not in SECTIONS:
            problems.append(f"{path}: {table}: unknown table{suggest(table, SECTIONS)}")
        elif not isinstance(value, dict):
            problems.append(f"{path}: {table}: must be a table, got {value!r}")
    for table, cls in SECTIONS.items():
        value = raw.get(table, {})
        value = value if isinstance(value, dict) else {}
        sections[table], found = parse_section(
            cls, value, f"{path}: {table}", open_keys=table in OPEN_SECTIONS
        )
        problems += found
    if problems:
        raise ConfigError(problems)
    return Config(path=path, raw=raw, **sections)
