"""The named benchmark scenarios of `bench/run.py` and the `meshtrain run` command for each.

Every scenario runs on synthetic tokens (no tokenizer, no corpus), never checkpoints and never
resumes, so runs differ only in layout, precision and model. Global batch is 16 sequences of 128
tokens (2048 tokens per step) in every small-/ref- scenario, so tokens/s compare directly.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REF = ROOT / "configs" / "smollm_cpu.toml"
TINY = ROOT / "configs" / "tiny_cpu.toml"
MOE = ROOT / "configs" / "qwen3_moe_cpu.toml"

# bench-small: the reference's vocabulary (so the embedding/logits cost is real) on a small body,
# with the defaults the reference config changes to save memory, which a small model does not
# need: gradients reduced once per step, and tcmalloc where it is installed.
SMALL_MODEL = [
    'parallel.grad_sync="step"',
    'run.malloc="auto"',
    "model.hidden_size=256",
    "model.intermediate_size=1024",
    "model.num_hidden_layers=4",
    "model.num_attention_heads=4",
    "model.num_key_value_heads=4",
    "model.vocab_size=49152",
    "model.max_position_embeddings=128",
    "model.tie_word_embeddings=true",
    "train.seq_len=128",
]
# --quick: a model small enough that every scenario finishes in seconds (smoke test only).
QUICK_MODEL = [
    "model.hidden_size=64",
    "model.intermediate_size=256",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=4",
    "model.num_key_value_heads=4",
    "model.vocab_size=512",
    "model.max_position_embeddings=256",
]
QUICK_STEPS = 3
# bench-moe: Qwen3-MoE blocks, small: 8 experts (2 per token) of width 512 in each of 4 layers.
MOE_MODEL = [
    "model.hidden_size=256",
    "model.moe_intermediate_size=512",
    "model.num_hidden_layers=4",
    "model.num_attention_heads=4",
    "model.num_key_value_heads=4",
    "model.head_dim=64",
    "model.vocab_size=8192",
    "train.seq_len=128",
]
MOE_DP2 = ["parallel.dp=2", "parallel.pp=1", "parallel.tp=1", "parallel.dp_shard=false"]

ONE_PROCESS = ["parallel.dp=1", "parallel.pp=1", "parallel.tp=1", "parallel.dp_shard=false"]
LAYOUT_8 = ["parallel.dp=2", "parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=true"]
# bench-small's 8 workers: the reference layout, replicated over dp (the default, dp_shard false):
# FSDP2 saves memory a small model does not need, at the price of a gather of every unit per
# micro-batch (small-8-fsdp shows it).
SMALL_LAYOUT_8 = ["parallel.dp=2", "parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=false"]
BF16 = ['train.precision="bf16"']
# dp = 1 keeps 4 sequences per micro-batch, so 4 micro-batches make the same 16-sequence batch.
BATCH_DP1 = ["train.micro_batch_size=4", "train.grad_acc=4"]
BATCH_DP2 = ["train.micro_batch_size=4", "train.grad_acc=2"]
TP2PP2 = ["parallel.dp=1", "parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=false", *BATCH_DP1]
GRAD_SYNC_STEP = ['parallel.grad_sync="step"']
# What a user waits for before anything runs: `meshtrain check` of the reference config and the
# plugin catalog (best of 3 wall times each).
COMMANDS = {
    "check": ["check", str(ROOT / "configs" / "smollm_cpu.toml")],
    "plugins": ["plugins"],
}


@dataclass(frozen=True, kw_only=True)
class Scenario:
    name: str
    config: Path
    overrides: list[str] = field(default_factory=list)
    workers: int
    precision: str = "fp32"
    steps: int = 5
    """Default step count (`--steps` replaces it, except for a startup-only scenario)."""
    startup_only: bool = False
    """Only the time from command to first step matters; `--steps` does not apply."""
    profile: bool = False
    """Count and time the collectives (log.comms, log.comm_time) for the step breakdown."""
    malloc: str = ""
    """run.malloc for this run ("": the config's)."""


def reference_layouts(malloc: str) -> list[Scenario]:
    """ref-8, ref-tp2pp2 and ref-1 on `malloc` (named "-<malloc>" when it is not the config's)."""
    suffix = f"-{malloc}" if malloc else ""
    return [
        Scenario(name=f"ref-8{suffix}", config=REF, workers=8, malloc=malloc),
        Scenario(
            name=f"ref-tp2pp2{suffix}", config=REF, workers=4, overrides=TP2PP2, malloc=malloc
        ),
        Scenario(
            name=f"ref-1{suffix}",
            config=REF,
            workers=1,
            overrides=ONE_PROCESS + BATCH_DP1,
            malloc=malloc,
        ),
    ]


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        *(
            Scenario(
                name=f"small-8{'-prof' if profile else ''}",
                config=REF,
                overrides=SMALL_MODEL + SMALL_LAYOUT_8 + BATCH_DP2,
                workers=8,
                steps=10 if profile else 20,
                profile=profile,
            )
            for profile in (False, True)
        ),
        # The same with the reference's FSDP2: what sharding costs a model that does not need it.
        Scenario(
            name="small-8-fsdp",
            config=REF,
            overrides=SMALL_MODEL + LAYOUT_8 + BATCH_DP2,
            workers=8,
            steps=20,
        ),
        Scenario(
            name="small-1",
            config=REF,
            overrides=SMALL_MODEL + ONE_PROCESS + BATCH_DP1,
            workers=1,
            steps=20,
        ),
        # ref-8 with its collectives counted and timed: the breakdown, apart from the run
        # whose speed and memory count (the profiler's records cost both).
        Scenario(name="ref-8-prof", config=REF, workers=8, steps=3, profile=True),
        # The reference config's memory settings, one at a time back to the default, and
        # activation checkpointing and compile on top of it.
        Scenario(name="ref-8-step", config=REF, overrides=GRAD_SYNC_STEP, workers=8, steps=3),
        *(
            Scenario(
                name=f"ref-8-ac-{mode}",
                config=REF,
                overrides=[f'train.activation_checkpointing="{mode}"'],
                workers=8,
                steps=3,
            )
            for mode in ("full", "selective")
        ),
        Scenario(
            name="ref-8-compile", config=REF, overrides=["train.compile=true"], workers=8, steps=3
        ),
        Scenario(name="ref-8-bf16", config=REF, overrides=BF16, workers=8, precision="bf16"),
        # The reference config runs on glibc's malloc, for its memory; the same three layouts
        # on tcmalloc show the speed (where it is installed).
        *reference_layouts(""),
        *reference_layouts("tcmalloc"),
        Scenario(
            name="ref-1-bf16",
            config=REF,
            overrides=ONE_PROCESS + BATCH_DP1 + BF16,
            workers=1,
            precision="bf16",
        ),
        *(
            Scenario(
                name=f"moe-ep{ep}",
                config=MOE,
                overrides=[*MOE_MODEL, *MOE_DP2, f"parallel.ep={ep}", *BATCH_DP2],
                workers=2,
                steps=10,
            )
            for ep in (1, 2)
        ),
        Scenario(
            name="tiny-8-startup",
            config=TINY,
            overrides=LAYOUT_8,
            workers=8,
            steps=2,
            startup_only=True,
        ),
    ]
}


def steps_for(scenario: Scenario, steps: int | None, quick: bool) -> int:
    """Steps to run: QUICK_STEPS in quick mode, else `--steps`, else the scenario's default."""
    if quick:
        return QUICK_STEPS
    if steps is None or scenario.startup_only:
        return scenario.steps
    return steps


def build_command(scenario: Scenario, run_dir: Path, steps: int, quick: bool) -> list[str]:
    """`python -m meshtrain run CONFIG --set ...` (the same as the `meshtrain` command)."""
    overrides = [
        *scenario.overrides,
        *(QUICK_MODEL if quick else []),
        'data.source="synthetic"',
        f'train.precision="{scenario.precision}"',  # never "auto": the table names it
        f'run.dir="{run_dir}"',
        "checkpoint.every=0",
        'checkpoint.resume="never"',
        f"train.steps={steps}",
        *(["log.comms=true", "log.comm_time=true"] if scenario.profile else []),
        *([f'run.malloc="{scenario.malloc}"'] if scenario.malloc else []),
    ]
    command = [sys.executable, "-m", "meshtrain", "run", str(scenario.config)]
    for item in overrides:
        command += ["--set", item]
    return command
