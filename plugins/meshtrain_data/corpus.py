"""The offline corpus: text that ships with every Python, so a first run needs no network.

Documents, in this order, until `corpus_mb` is reached: each topic of the language reference
(`pydoc_data.topics`), the docstrings of each standard-library module (read with `ast`, never
imported), then, with `sources = true`, the stdlib source files themselves. Written once as
jsonl ({"text": ...} per line) under <cache_dir>/offline/, then read like any `hf` json file.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

SKIP_PARTS = {"test", "tests", "site-packages", "dist-packages", "idlelib", "__pycache__"}
FORMAT = "offline-corpus-1"


def build_corpus(cache_dir: Path, corpus_mb: float, sources: bool) -> Path:
    """The corpus jsonl for this Python and these settings, written on first use."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    key = hashlib.sha256(f"{FORMAT}\n{sys.version}\n{stdlib}\n{corpus_mb}\n{sources}".encode())
    path = cache_dir / "offline" / f"corpus-{key.hexdigest()[:16]}.jsonl"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    budget = int(corpus_mb * 1e6)
    with open(tmp, "w", encoding="utf-8") as f:
        for text in iter_documents(stdlib, sources):
            if budget <= 0:
                break
            text = text[:budget]
            f.write(json.dumps({"text": text}) + "\n")
            budget -= len(text.encode())
    os.replace(tmp, path)
    return path


def iter_documents(stdlib: Path, sources: bool) -> Iterator[str]:
    """Language reference topics, then module docstrings, then (optionally) module sources."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name].strip()
    files = _stdlib_files(stdlib)
    for path in files:
        docs = _docstrings(path)
        if docs:
            yield docs
    if sources:
        for path in files:
            yield path.read_text(encoding="utf-8", errors="replace")


def _stdlib_files(stdlib: Path) -> list[Path]:
    return sorted(
        p for p in stdlib.rglob("*.py") if not SKIP_PARTS.intersection(p.relative_to(stdlib).parts)
    )


def _docstrings(path: Path) -> str:
    """Module, class and function docstrings of one file, blank-line separated."""
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):  # a few stdlib files are deliberately broken or not utf-8
        return ""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds))
    return "\n\n".join(d for d in docs if d)
