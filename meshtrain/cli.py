"""The `meshtrain` command (also `python -m meshtrain`).

    meshtrain run CONFIG [--set key=value ...]     train (starts dp*pp*tp workers)
    meshtrain check CONFIG [--set key=value ...]   validate; print the config and the rank layout
    meshtrain plugins                              installed plugins and what they provide
    meshtrain export RUN_DIR_OR_CHECKPOINT OUT_DIR a Hugging Face folder from a checkpoint
    meshtrain sample RUN_DIR_OR_CHECKPOINT --prompt TEXT [--max-new-tokens N] [--temperature T]
                                                   [--seed S]  continue a prompt

A `UserError` exits with status 2 and one `error: ` line per problem (MESHTRAIN_DEBUG=1 re-raises
it with the traceback). The tables that `check` and `plugins` produce are this command's output,
so they go to stdout with print; diagnostics go through `logging`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshtrain import __version__
from meshtrain.errors import UserError

if TYPE_CHECKING:  # the heavy imports wait until a subcommand needs them
    from meshtrain.job import Job
    from meshtrain.layout import RankLayout

MIB = 2**20


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the process exit status."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on bad arguments
    # Only the command's own process (argv from the command line) may re-execute itself or
    # change its malloc for a world of one (meshtrain/malloc.py); not a caller's Python.
    args.own_process = argv is None
    try:
        return args.command(args)
    except UserError as err:
        if os.environ.get("MESHTRAIN_DEBUG", "") not in ("", "0"):
            raise
        for line in err.problems:
            print(f"error: {line}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshtrain", description="Train LLMs with 3D parallelism (dp, pp, tp)."
    )
    parser.add_argument("--version", action="version", version=f"meshtrain {__version__}")
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")
    plan_text = "simulate one step of a layout's ranks: memory per rank, collectives per axis"
    configs = {}
    for name, command, text in [
        ("run", cmd_run, "train a model from a TOML config"),
        ("check", cmd_check, "validate a config and print its layout"),
        ("plan", cmd_plan, plan_text),
    ]:
        one = configs[name] = sub.add_parser(name, help=text, description=text)
        one.add_argument("config", type=Path, help="TOML config file")
        one.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a key, value parsed as TOML (e.g. --set parallel.tp=2); repeatable",
        )
        one.set_defaults(command=command)
    one = configs["plan"]
    one.add_argument(
        "--device-memory", metavar="SIZE", help="memory of one device, e.g. 80GiB: does it fit?"
    )
    one.add_argument(
        "--compare",
        nargs="+",
        default=[],
        metavar="LAYOUT",
        help='layouts side by side, each "dp=16,pp=8,tp=8" (also ep, sp, dp_shard, schedule, '
        "grad_acc, mbs, ac, or any dotted key)",
    )
    one.add_argument("--json", action="store_true", help="print JSON instead of tables")
    one = sub.add_parser("plugins", help="list installed plugins and the names they provide")
    one.set_defaults(command=cmd_plugins)
    one = sub.add_parser("export", help="write a Hugging Face folder from a checkpoint")
    one.add_argument("source", type=Path, help="run directory or checkpoint folder")
    one.add_argument("out", type=Path, help="output folder")
    one.set_defaults(command=cmd_export)
    one = sub.add_parser("sample", help="continue a prompt with a trained checkpoint")
    one.add_argument("source", type=Path, help="run directory or checkpoint folder")
    one.add_argument("--prompt", required=True, help="text to continue")
    one.add_argument("--max-new-tokens", type=int, default=50, help="tokens to add (50)")
    one.add_argument(
        "--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (0.8)"
    )
    one.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    one.set_defaults(command=cmd_sample)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from meshtrain import malloc
    from meshtrain.config import load_config
    from meshtrain.job import device_type, resolve_job
    from meshtrain.launch import launch, started_by_launcher  # `check` works without it

    # Under torchrun or srun every worker runs this command: the file checks run once per node,
    # on local rank 0, which also prepares the data (the others would only repeat them).
    # With several workers this job only prepares and launches them (each resolves its own), so
    # the family may answer from its declared config, without importing the model's code.
    once_per_node = int(os.environ.get("LOCAL_RANK", "0")) == 0
    config = load_config(args.config, args.overrides)
    # A process that trains (a world of one, or a worker torchrun or srun started) takes its
    # malloc from the environment at startup: it restarts itself on run.malloc's choice.
    if args.own_process and (config.world_size == 1 or started_by_launcher()):
        malloc.apply_here(malloc.choose(config.run.malloc, device_type(config.run.device)))
    job = resolve_job(config, preflight=once_per_node, declared=config.world_size > 1)
    return int(launch(job) or 0)


def cmd_check(args: argparse.Namespace) -> int:
    from meshtrain.config import load_config
    from meshtrain.job import resolve_job
    from meshtrain.layout import build_layout

    # declared: the family's own description of its model, so that neither torch nor the
    # model's code need load (seconds of imports for a printout).
    job = resolve_job(load_config(args.config, args.overrides), preflight=True, declared=True)
    print(format_config(job))
    print(format_layout(job, build_layout(job)))
    for warning in job.warnings:
        print(f"warning: {warning}")
    print(f"ok: {args.config} is valid")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from meshtrain.plan import format_plans, parse_bytes, plan_layouts, plans_json

    memory = parse_bytes(args.device_memory) if args.device_memory else None
    plans = plan_layouts(args.config, args.overrides, args.compare)
    print(plans_json(plans, memory) if args.json else format_plans(plans, memory))
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from meshtrain.plugins import CATALOGS, Plugins

    infos = Plugins().describe()
    for info in infos:
        print(f"{info.name}  ({info.distribution} {info.version})")
        print(f"  hooks: {', '.join(info.hooks) or '-'}")
        for hook, names in info.provides.items():
            print(f"  {CATALOGS[hook]}: {', '.join(names)}")
    if not infos:
        print("no plugins installed")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from meshtrain.export import export_checkpoint

    export_checkpoint(Path(args.source), Path(args.out))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from meshtrain.sample import sample

    text = sample(
        args.source,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
    )
    print(text)
    return 0


def format_config(job: Job) -> str:
    """The resolved config as TOML: every section with defaults filled in."""
    from meshtrain.config import OPEN_SECTIONS, SECTIONS

    config, lines = job.config, [f"# resolved config: {job.config.path}"]
    for table in SECTIONS:
        section = getattr(config, table)
        lines.append(f"\n[{table}]")
        for item in dataclasses.fields(section):
            if item.name == "options" and table in OPEN_SECTIONS:
                continue
            value = toml_value(getattr(section, item.name))
            if (table, item.name) == ("model", "family") and job.family_name != config.model.family:
                value = f"{toml_value(job.family_name)}  # {value}: from model.name's model_type"
            lines.append(f"{item.name} = {value}")
        if table == "model":
            lines += [f"{k} = {toml_value(v)}" for k, v in config.model.options.items()]
        if table == "data" and dataclasses.is_dataclass(job.data_options):
            lines += [
                f"{item.name} = {toml_value(getattr(job.data_options, item.name))}"
                for item in dataclasses.fields(job.data_options)
            ]
    return "\n".join(lines)


def toml_value(value: Any) -> str:
    """`value` written as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(str(value))


def format_layout(job: Job, rows: list[RankLayout]) -> str:
    """The mesh, the stage/layer table and one line per rank."""
    from meshtrain.layout import count_parameters
    from meshtrain.stages import describe_stages

    par, shape = job.config.parallel, job.shape
    world, stages = job.config.world_size, job.num_stages
    lines = [
        f"\n# layout: {world} rank{'s' * (world > 1)} = dp {par.dp} x pp {par.pp} x tp "
        f"{par.tp} (rank = (dp*{par.pp} + pp)*{par.tp} + tp), "
        f"schedule {job.config.pipeline.schedule}, {stages} stage{'s' * (stages > 1)}",
        f"model: {count_parameters(job):,} parameters, {shape.num_layers} layers",
        *_experts_line(job),
        *describe_stages(shape.num_layers, stages),
        "",
    ]
    header = (
        f"{'rank':>4}  {'(dp, pp, tp)':<12}  {'stage':<5}  {'layers':<10}  {'params':>13}"
        f"  {'state':>7}  {'activ':>7}  {'logits':>7}  {'working':>7}  {'total MiB':>9}"
    )
    lines += [header, "-" * len(header), *map(_rank_line, rows)]
    total = sum(row.memory.total for row in rows)
    lines.append(f"estimated peak memory of all {world} ranks together: {total / 2**30:.1f} GiB")
    lines += [
        "",
        "params: stored on each rank (weights in the tp plan / tp, experts / ep"
        + (", everything / dp for parallel.dp_shard)." if par.dp_shard else ")."),
        "memory (estimate): state = fp32 params + grads + AdamW moments; activ = fp32",
        "activations of the in-flight micro-batches (1F1B); logits on the last stage;",
        "working = gathered weights and unsharded gradients (FSDP);",
        "total adds ~460 MiB per worker for torch + transformers (meshtrain/layout.py).",
        *_malloc_line(job),
    ]
    return "\n".join(lines)


def _malloc_line(job: Job) -> list[str]:
    from meshtrain import malloc

    library = malloc.choose(job.config.run.malloc, job.device_type)
    if library is None:
        return []
    return [
        f"malloc: {library} (run.malloc {job.config.run.malloc}) keeps freed pages",
        f"for reuse, so peaks run above this estimate: {malloc.RETAINED}.",
        'run.malloc = "system" has the lowest peak.',
    ]


def _experts_line(job: Job) -> list[str]:
    shape, par = job.shape, job.config.parallel
    if not shape.num_experts:
        return []
    return [
        f"experts: {shape.num_experts} in each of {shape.moe_layers} MoE blocks, "
        f"{shape.num_experts // par.ep} per rank (parallel.ep {par.ep} of dp {par.dp}: "
        f"each group of {par.ep} dp ranks holds all {shape.num_experts})"
    ]


def _rank_line(row: RankLayout) -> str:
    mem, layers = row.memory, ", ".join(_span(r) for r in row.layers)
    return (
        f"{row.rank:>4}  {f'({row.dp}, {row.pp}, {row.tp})':<12}  "
        f"{','.join(map(str, row.stages)):<5}  {layers:<10}  {row.params:>13,}  "
        f"{mem.state / MIB:>7,.0f}  {mem.activations / MIB:>7,.0f}  "
        f"{mem.logits / MIB:>7,.0f}  {mem.working / MIB:>7,.0f}  {mem.total / MIB:>9,.0f}"
    )


def _span(layers: range) -> str:
    last = layers.stop - 1
    return str(last) if layers.start == last else f"{layers.start}-{last}"
