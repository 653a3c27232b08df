"""The parallel degrees checked against the model's shape and the schedule, before any process
starts: one line per problem, naming the keys (`resolve_job` collects them with the rest)."""

from __future__ import annotations

from meshtrain.config import Config
from meshtrain.contracts import ModelShape, PipelineSchedule


def check_degrees(config: Config, shape: ModelShape, schedule: PipelineSchedule) -> list[str]:
    """Degree arithmetic against the model, one line per problem naming the keys."""
    p, par, train = config.path, config.parallel, config.train
    problems = [
        f"{p}: parallel.tp: {par.tp} does not divide {key} ({size})"
        for key, size in shape.tp_divisible.items()
        if size % par.tp
    ]
    problems += [
        f"{p}: parallel.tp: {par.tp} does not divide {key} ({size}) nor is it a multiple of it"
        for key, size in shape.tp_divisible_or_multiple.items()
        if size % par.tp and par.tp % size
    ]
    problems += _expert_problems(config, shape)
    stages = par.pp * schedule.stages_per_rank
    if stages > shape.num_layers:
        problems.append(
            f"{p}: parallel.pp: {par.pp} ranks x {schedule.stages_per_rank} stages "
            f"per rank = {stages} stages exceed the {shape.num_layers} layers "
            "(model.num_hidden_layers)"
        )
    problems += [
        f"{p}: {line}"
        for line in schedule.validate(
            pp=par.pp, grad_acc=train.grad_acc, num_layers=shape.num_layers
        )
    ]
    if train.seq_len > shape.max_positions:
        problems.append(
            f"{p}: train.seq_len: {train.seq_len} exceeds the model's "
            f"{shape.max_positions} positions (model.max_position_embeddings)"
        )
    if (
        schedule.splits_backward
        and par.pp > 1
        and par.fsdp
        and par.reshard_after_forward == "always"
    ):
        problems.append(
            f"{p}: parallel.reshard_after_forward: 'always' cannot be used with "
            f"pipeline.schedule {config.pipeline.schedule!r}, which splits backward into input "
            "and weight passes that need the gathered weights; use 'auto' or 'never'"
        )
    if schedule.splits_backward and par.pp > 1 and par.grad_sync == "microbatch":
        problems.append(
            f"{p}: parallel.grad_sync: 'microbatch' cannot be used with pipeline.schedule "
            f"{config.pipeline.schedule!r}, which splits backward into input and weight passes "
            "(gradients exist only after the last); use 'step'"
        )
    if par.sequence_parallel and train.seq_len % par.tp:
        problems.append(
            f"{p}: train.seq_len: {train.seq_len} must be divisible by parallel.tp "
            f"({par.tp}) for parallel.sequence_parallel"
        )
    return problems


def _expert_problems(config: Config, shape: ModelShape) -> list[str]:
    """parallel.ep against dp (where its ranks come from) and the experts it spreads."""
    p, par = config.path, config.parallel
    if par.ep == 1:
        return []
    if not shape.num_experts:
        return [f"{p}: parallel.ep: {par.ep} but the model has no experts (a dense model)"]
    problems = [
        f"{p}: parallel.ep: {par.ep} does not divide {key} ({size})"
        for key, size in shape.ep_divisible.items()
        if size % par.ep
    ]
    if par.dp % par.ep:
        problems.append(
            f"{p}: parallel.ep: {par.ep} does not divide parallel.dp ({par.dp}); "
            "expert-parallel ranks are taken from the data-parallel ones"
        )
    return problems
