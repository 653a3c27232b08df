"""Checks that read files, run by `meshtrain check` and `meshtrain run` before any worker starts
(workers skip them): each returns problem lines instead of raising, so one run names them all.

    data_problems(source, options, config, shape)   the data source's own `check`
    run_problems(job)                               run dir, checkpoint to resume, HF weights

It also builds the DataContext every data source call gets (`context`, `cache_dir`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshtrain.contracts import DataContext
from meshtrain.errors import UserError

if TYPE_CHECKING:
    from meshtrain.config import Config
    from meshtrain.contracts import ModelShape
    from meshtrain.job import Job


def data_problems(source: Any, options: Any, config: Config, shape: ModelShape | None) -> list[str]:
    """What the source's optional `check(options, ctx)` finds (files, tokenizer, columns), each
    line prefixed with the config file. Without a model shape the vocabulary is not checked."""
    check = getattr(source, "check", None)
    if not callable(check):
        return []
    ctx = context(config, shape.vocab_size if shape else 0, dp_rank=0)
    try:
        found = list(check(options, ctx))
    except UserError as err:
        found = err.problems
    return [f"{config.path}: {line}" for line in found]


def context(config: Config, vocab_size: int, dp_rank: int) -> DataContext:
    """The DataContext of `config` for dp rank `dp_rank` (vocab_size 0: not known)."""
    return DataContext(
        seq_len=config.train.seq_len,
        micro_batch_size=config.train.micro_batch_size,
        grad_acc=config.train.grad_acc,
        dp=config.parallel.dp,
        dp_rank=dp_rank,
        seed=config.train.seed,
        vocab_size=vocab_size,
        run_dir=config.run_dir,
        cache_dir=cache_dir(),
    )


def cache_dir() -> Path:
    """Where data sources cache corpora and tokenizers ($MESHTRAIN_CACHE or ~/.cache/meshtrain)."""
    return Path(os.environ.get("MESHTRAIN_CACHE", Path.home() / ".cache" / "meshtrain"))


def write_cache(path: Path, value: Any) -> None:
    """Write `value` as JSON to `path`, whole or not at all, whoever else writes it; raises
    OSError where it cannot (a cache that cannot be written only costs time)."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(value, sort_keys=True) + "\n")
        partial.replace(path)
    except OSError:
        partial.unlink(missing_ok=True)
        raise


def run_problems(job: Job) -> list[str]:
    """The run dir can be written; the checkpoint to resume fits; model.name's weights do."""
    from meshtrain.resume import check_resume

    where, problems = job.config.path, []
    problem = writable_problem(job.config.run_dir)
    if problem:
        problems.append(f"{where}: run.dir: {problem}")
    try:
        check_resume(job)
    except UserError as err:
        problems += err.problems
    if job.config.model.pretrained:
        from meshtrain.weights import hf_weight_problems

        problems += [f"{where}: {line}" for line in hf_weight_problems(job)]
    return problems


def writable_problem(folder: Path) -> str:
    """'' if `folder` exists as a writable directory or can be created; else why not."""
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return f"{folder} cannot be created: {existing} is a file"
    if existing == folder:
        return "" if os.access(folder, os.W_OK | os.X_OK) else f"{folder} is not writable"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{folder} cannot be created: {existing} is not writable"
    return ""
