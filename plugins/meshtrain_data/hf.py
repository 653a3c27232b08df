"""`source = "hf"`: a Hugging Face dataset (hub id or local files) and a Hugging Face tokenizer.

    [data]
    source = "hf"
    dataset = "corpus/*.parquet"
    tokenizer = "path/to/tokenizer"

`prepare` tokenizes the split once into the token cache (see `packing`), keyed by the files'
content hash (or the hub dataset's fingerprint) and the tokenizer's; `open` memory-maps it. With
`streaming = true`, `prepare` only checks the inputs and each worker tokenizes as it trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meshtrain.api import DataContext, DataStream, UserError
from meshtrain_data.dataset import DatasetRef, check_column, load_rows, resolve_dataset
from meshtrain_data.options import HFOptions, as_options
from meshtrain_data.packing import (
    build_token_cache,
    check_enough,
    content_key,
    hash_file,
    load_tokens,
    publish,
    read_pointer,
)
from meshtrain_data.stream import PackedStream
from meshtrain_data.streaming import StreamingStream
from meshtrain_data.tokenizer import check_tokenizer, fingerprint, load_tokenizer

BATCH_ROWS = 1000  # documents per tokenizer call: big enough for the Rust side to go parallel


class HFSource:
    """Local txt/json/jsonl/parquet files or a hub dataset, packed into seq_len + 1 windows."""

    config_class = HFOptions

    def prepare(self, options: Any, ctx: DataContext) -> None:
        opts = as_options(HFOptions, options)
        ref = resolve_dataset(opts.dataset)
        tokenizer = load_tokenizer(opts.tokenizer)
        eos = check_tokenizer(tokenizer, ctx.vocab_size)
        if opts.streaming:
            _check_stream(ref, opts, ctx)
            publish(ctx, tokenizer, None, {"streaming": True})
            return
        rows = load_rows(ref, opts, ctx.cache_dir)
        check_column(rows, opts.text_column, opts.dataset)
        key = content_key(
            _data_hash(ref, rows), opts.split, opts.name, opts.text_column, fingerprint(tokenizer)
        )
        batches = (
            b[opts.text_column]
            for b in rows.select_columns([opts.text_column]).iter(batch_size=BATCH_ROWS)
        )
        out = ctx.cache_dir / "tokens" / key
        meta = build_token_cache(batches, tokenizer, eos, out, describe=opts.dataset)
        check_enough(meta, ctx, repr(opts.dataset))
        publish(ctx, tokenizer, out, {"streaming": False})

    def open(self, options: Any, ctx: DataContext) -> DataStream:
        opts = as_options(HFOptions, options)
        pointer = read_pointer(ctx)
        if pointer.get("streaming"):
            return _open_stream(opts, ctx)
        return PackedStream(load_tokens(Path(pointer["tokens"])), ctx, shuffle=opts.shuffle)


def _data_hash(ref: DatasetRef, rows: Any) -> str:
    """Content hash of local files; the hub dataset's own fingerprint of its cached files."""
    if ref.is_hub:
        return f"hub:{ref.value}:{getattr(rows, '_fingerprint', '')}"
    return "\n".join(f"{p.name}:{hash_file(p)}" for p in ref.files)


def _check_stream(ref: DatasetRef, opts: HFOptions, ctx: DataContext) -> None:
    """Open the stream and read its first row, so mistakes surface before workers start."""
    rows = load_rows(ref, opts, ctx.cache_dir, streaming=True)
    first = next(iter(rows), None)
    if first is None:
        raise UserError(f"data.dataset: {opts.dataset!r} has no rows")
    if opts.text_column not in first:
        raise UserError(
            f"data.text_column: {opts.text_column!r} is not a column of "
            f"{opts.dataset!r} (columns: {', '.join(first)})"
        )


def _open_stream(opts: HFOptions, ctx: DataContext) -> StreamingStream:
    from transformers import AutoTokenizer

    ref = resolve_dataset(opts.dataset)
    tokenizer = AutoTokenizer.from_pretrained(str(ctx.run_dir / "tokenizer"))

    def texts() -> Any:
        rows = load_rows(ref, opts, ctx.cache_dir, streaming=True)
        return (b[opts.text_column] for b in rows.iter(batch_size=BATCH_ROWS))

    return StreamingStream(texts, tokenizer, ctx, describe=opts.dataset)
