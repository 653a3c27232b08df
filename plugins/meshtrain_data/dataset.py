"""Find and open the rows behind `data.dataset`: local txt/json/jsonl/parquet files or a hub id.

    rows = load_rows(resolve_dataset("data/*.jsonl"), options, cache_dir)

Local files go through the `datasets` packaged builders (text, json, parquet), hub ids through
`datasets.load_dataset` after a fast reachability check. Every failure is one line naming the key.
"""

from __future__ import annotations

import glob
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshtrain.api import (
    UserError,
    first_line,
    hub_offline,
    looks_like_hub_id,
    offline_error,
    require_hub,
)
from meshtrain_data.options import HFOptions

KEY = "data.dataset"
BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class DatasetRef:
    """What `data.dataset` names: a packaged builder over local files, or a hub id."""

    value: str
    builder: str  # "text" / "json" / "parquet", or the hub id
    files: tuple[Path, ...] = ()

    @property
    def is_hub(self) -> bool:
        return not self.files


def resolve_dataset(value: str) -> DatasetRef:
    """Local files (a file, a folder searched recursively, or a glob) or a hub id."""
    if not value:
        raise UserError(
            f'{KEY}: required for source = "hf" (a hub id, a file, a folder or a '
            f'glob); or use source = "offline"'
        )
    path = Path(value).expanduser()
    if any(c in value for c in "*?["):
        files = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))]
        files = [p for p in files if p.is_file()]
        if not files:
            raise UserError(f"{KEY}: no files match {value!r}")
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in BUILDERS and p.is_file())
        if not files:
            raise UserError(f"{KEY}: folder {value!r} holds no {'/'.join(BUILDERS)} files")
    elif path.is_file():
        files = [path]
    elif looks_like_hub_id(value):
        return DatasetRef(value, value)
    else:
        raise UserError(f"{KEY}: file not found: {value!r}")
    if all(p.stat().st_size == 0 for p in files):  # datasets fails obscurely on these
        raise UserError(f"{KEY}: {value!r} is empty (no rows)")
    return DatasetRef(value, _builder(value, files), tuple(files))


def _builder(value: str, files: list[Path]) -> str:
    suffixes = sorted({p.suffix for p in files})
    unknown = [s for s in suffixes if s not in BUILDERS]
    if unknown:
        names = ", ".join(s or "no suffix" for s in unknown)
        raise UserError(
            f"{KEY}: {value!r} has unsupported files ({names}); use {', '.join(BUILDERS)}"
        )
    builders = {BUILDERS[s] for s in suffixes}
    if len(builders) > 1:
        raise UserError(f"{KEY}: {value!r} mixes {', '.join(suffixes)} files; use one format")
    return builders.pop()


def check_files(ref: DatasetRef, max_lines: int | None = None) -> None:
    """Local text and JSON files decode as UTF-8 and, for .jsonl, hold one JSON object per line
    (the first `max_lines` of each, or all); else one line naming the file and the line (datasets
    would fail deep inside pyarrow)."""
    import json

    for path in ref.files:
        if path.suffix not in (".txt", ".json", ".jsonl"):
            continue
        whole_json = path.suffix == ".json" and _starts_with(path, b"[")
        with open(path, "rb") as f:
            for number, raw in enumerate(itertools.islice(f, max_lines), 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise UserError(
                        f"{KEY}: {path}:{number}: not UTF-8 text (byte {err.start}: "
                        f"{raw[err.start : err.start + 1]!r})"
                    ) from None
                if path.suffix == ".txt" or whole_json or not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except ValueError as err:
                    raise UserError(
                        f"{KEY}: {path}:{number}: not a JSON object per line ({err})"
                    ) from None
                if not isinstance(value, dict):
                    raise UserError(
                        f"{KEY}: {path}:{number}: a JSON {type(value).__name__}, expected an "
                        'object such as {"text": "..."}'
                    )


def _starts_with(path: Path, prefix: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(4096).lstrip().startswith(prefix)


def load_rows(
    ref: DatasetRef, options: HFOptions, cache_dir: Path, *, streaming: bool = False
) -> Any:
    """The split as a `datasets.Dataset` (or `IterableDataset` when streaming)."""
    import datasets

    kwargs: dict[str, Any] = {
        "split": options.split,
        "streaming": streaming,
        "cache_dir": str(cache_dir / "datasets"),
    }
    if ref.is_hub:
        offline = hub_offline()
        if not offline:
            require_hub(KEY, ref.value)
        args: tuple = (ref.value, options.name or None)
    else:
        offline = False
        args = (ref.builder,)
        kwargs["data_files"] = [str(p) for p in ref.files]
        if ref.builder == "text":
            kwargs["sample_by"] = "paragraph"
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as err:  # datasets raises many types; all mean "cannot read this"
        if offline:
            raise offline_error(KEY, ref.value, "file, folder or glob") from None
        key = "data.split" if "split" in str(err).lower() else KEY
        raise UserError(
            f"{key}: cannot load {ref.value!r} (split {options.split!r}): {first_line(err)}"
        ) from None


def check_column(rows: Any, column: str, value: str) -> None:
    """The split has rows and a text column of strings; else one line naming the key."""
    if hasattr(rows, "__len__") and len(rows) == 0:
        raise UserError(f"{KEY}: {value!r} has no rows")
    names = list(rows.column_names or [])
    if column not in names:
        raise UserError(
            f"data.text_column: {column!r} is not a column of {value!r} "
            f"(columns: {', '.join(names) or 'none'})"
        )
    feature = getattr((rows.features or {}).get(column), "dtype", "string")
    if feature not in ("string", "large_string"):
        raise UserError(f"data.text_column: {column!r} of {value!r} holds {feature}, not text")
