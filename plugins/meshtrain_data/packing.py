"""The token cache: documents -> one flat array of ids joined by EOS, memory-mapped by workers.

Layout under `ctx.cache_dir`:

    tokens/<key>/tokens.bin   raw uint16 (vocab <= 65536) or uint32 token ids, no header
    tokens/<key>/meta.json    {"n_tokens", "dtype", "eos", "documents", "describe"}

`<key>` hashes the data's content and the tokenizer, so a second run (or another rank on the same
node) reuses it; the folder is written under a temporary name and renamed when complete, so a
crash never leaves a cache that looks valid. `<run_dir>/data_cache.json` points `open` at it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from meshtrain.api import DataContext, UserError

log = logging.getLogger("meshtrain.data")
FORMAT = "meshtrain-tokens-1"
POINTER = "data_cache.json"


def content_key(*parts: str) -> str:
    """A short hash of everything the cached tokens depend on."""
    return hashlib.sha256("\n".join([FORMAT, *parts]).encode()).hexdigest()[:20]


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def token_dtype(vocab: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)


def held_out(index: int, share: float) -> bool:
    """Whether document `index` (its row number in the source) is set aside for evaluation:
    every 1/share-th document, floor(n * share) of the first n, spread evenly."""
    return int((index + 1) * share + 1e-9) > int(index * share + 1e-9)


def split_documents(
    batches: Iterable[list[Any]], share: float, *, keep_held_out: bool
) -> Iterator[list[Any]]:
    """`batches` of documents with only the held-out ones (keep_held_out) or only the rest."""
    index = 0
    for texts in batches:
        kept = [t for i, t in enumerate(texts, index) if held_out(i, share) == keep_held_out]
        index += len(texts)
        yield kept


def build_token_cache(
    batches: Iterable[list[Any]], tokenizer: Any, eos: int, out: Path, describe: str
) -> dict[str, Any]:
    """Tokenize `batches` of texts into `out` unless it exists; returns its meta."""
    if (out / "meta.json").is_file():
        log.info("data: reusing tokens in %s", out)
        return json.loads((out / "meta.json").read_text())
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = token_dtype(len(tokenizer))
    n_tokens = n_docs = 0
    with open(tmp / "tokens.bin", "wb") as f:
        for ids, docs in encode_documents(batches, tokenizer, eos):
            np.asarray(ids, dtype=dtype).tofile(f)
            n_tokens, n_docs = n_tokens + len(ids), n_docs + docs
    meta = {
        "n_tokens": n_tokens,
        "dtype": dtype.name,
        "eos": eos,
        "documents": n_docs,
        "describe": describe,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        tmp.rename(out)
    except OSError:  # another process finished the same cache first; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("data: %d documents -> %d tokens in %s", n_docs, n_tokens, out)
    return meta


def encode_documents(
    batches: Iterable[list[Any]], tokenizer: Any, eos: int
) -> Iterator[tuple[list[int], int]]:
    """(ids, documents) per input batch: each non-empty document's ids followed by EOS."""
    for texts in batches:
        texts = [t for t in texts if isinstance(t, str) and t]
        if texts:
            encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
            yield list(itertools.chain.from_iterable(ids + [eos] for ids in encoded)), len(texts)


def check_enough(
    meta: dict[str, Any], ctx: DataContext, what: str, key: str = "data.dataset"
) -> None:
    """At least one full window of seq_len + 1 tokens, else a one-line error naming `key`."""
    if meta["n_tokens"] == 0:
        raise UserError(f"{key}: {what} holds no text")
    if meta["n_tokens"] < ctx.seq_len + 1:
        raise UserError(
            f"{key}: {what} holds {meta['n_tokens']} tokens, fewer than one "
            f"window of train.seq_len + 1 = {ctx.seq_len + 1}"
        )


def held_out_problem(meta: dict[str, Any], ctx: DataContext, share: float, what: str) -> str:
    """'' if the held-out cache of `meta` holds a window; else why [eval] cannot use it."""
    if not share:
        return "data.eval_share: 0 sets no documents aside for [eval]"
    if meta["n_tokens"] >= ctx.seq_len + 1:
        return ""
    return (
        f"data.eval_share: {share} of {what} is {meta['documents']} documents, "
        f"{meta['n_tokens']} tokens: fewer than one window of train.seq_len + 1 = "
        f"{ctx.seq_len + 1}; raise it (or name eval_split / eval_dataset)"
    )


def publish(ctx: DataContext, tokenizer: Any, tokens_dir: Path | None, extra: dict) -> None:
    """Save the tokenizer to <run_dir>/tokenizer and tell `open` where the tokens are (and
    `open_eval` where the held-out tokens are: extra["eval"]).

    Several nodes may publish into one shared run dir, each from its node-local cache: the
    pointer holds paths relative to the cache dir (the same key on every node, since the tokens
    are), and every file is replaced atomically, so no reader sees half a file."""
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    folder = ctx.run_dir / "tokenizer"
    tmp = ctx.run_dir / f".tokenizer.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(str(tmp))
    folder.mkdir(exist_ok=True)
    for item in tmp.iterdir():
        os.replace(item, folder / item.name)
    shutil.rmtree(tmp, ignore_errors=True)
    pointer = {
        "tokens": _relative(tokens_dir, ctx),
        **{k: _relative(v, ctx) if isinstance(v, Path) else v for k, v in extra.items()},
    }
    tmp_pointer = ctx.run_dir / f"{POINTER}.tmp-{os.getpid()}"
    tmp_pointer.write_text(json.dumps(pointer, indent=1))
    os.replace(tmp_pointer, ctx.run_dir / POINTER)


def _relative(path: Path | None, ctx: DataContext) -> str | None:
    if path is None:
        return None
    try:
        return str(Path(path).relative_to(ctx.cache_dir))
    except ValueError:
        return str(path)


def read_pointer(ctx: DataContext) -> dict[str, Any]:
    """The published pointer, its token folders resolved against this node's cache dir."""
    path = ctx.run_dir / POINTER
    if not path.is_file():
        raise RuntimeError(f"meshtrain_data: {path} is missing; call prepare() before open()")
    pointer = json.loads(path.read_text())
    for key in ("tokens", "eval"):
        if pointer.get(key):
            pointer[key] = str(ctx.cache_dir / pointer[key])  # an absolute path stays as it is
    return pointer


def load_tokens(tokens_dir: Path) -> np.ndarray:
    """The cached ids, memory-mapped read-only: workers share the page cache, not copies."""
    meta = json.loads((tokens_dir / "meta.json").read_text())
    return np.memmap(
        tokens_dir / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],)
    )
