"""`source = "hf"`: a Hugging Face dataset (hub id or local files) and a Hugging Face tokenizer.

    [data]
    source = "hf"
    dataset = "corpus/*.parquet"
    tokenizer = "path/to/tokenizer"

`prepare` tokenizes the split once into the token cache (see `packing`), keyed by the files'
content hash (or the hub dataset's fingerprint) and the tokenizer's; `open` memory-maps it. With
`streaming = true`, `prepare` only checks the inputs and each dp rank tokenizes its own share
of the documents as it trains (see `streaming`).

Held-out data for `[eval]`: `eval_split` / `eval_dataset` when set (packed whole by `prepare`,
also for streaming runs), else every 1/eval_share-th document of the split, never trained on.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from meshtrain.api import DataContext, DataStream, UserError, first_line
from meshtrain_data.dataset import (
    DatasetRef,
    check_column,
    check_files,
    load_rows,
    resolve_dataset,
)
from meshtrain_data.options import HFOptions, as_options
from meshtrain_data.packing import (
    build_token_cache,
    check_enough,
    content_key,
    hash_file,
    held_out_problem,
    load_tokens,
    publish,
    read_pointer,
    split_documents,
)
from meshtrain_data.stream import PackedStream, open_held_out
from meshtrain_data.streaming import StreamingStream
from meshtrain_data.tokenizer import check_tokenizer, fingerprint, load_tokenizer

BATCH_ROWS = 1000  # documents per tokenizer call: big enough for the Rust side to go parallel
CHECK_LINES = 10_000
"""Lines of each local file `check` decodes before workers start; `prepare` decodes all."""


class HFSource:
    """Local txt/json/jsonl/parquet files or a hub dataset, packed into seq_len + 1 windows."""

    config_class = HFOptions

    def check(self, options: Any, ctx: DataContext) -> list[str]:
        """Every problem with the dataset, its text column, the tokenizer and the held-out data,
        without tokenizing (a first row is read)."""
        opts = as_options(HFOptions, options)
        problems = _collect(lambda: _check_rows(opts, ctx, resolve_dataset(opts.dataset)))

        def tokenizer_fits() -> None:
            tokenizer = load_tokenizer(opts.tokenizer)
            if ctx.vocab_size:
                check_tokenizer(tokenizer, ctx.vocab_size)

        problems += _collect(tokenizer_fits)
        try:
            held = _explicit_eval(opts)
        except UserError as err:
            return problems + err.problems
        if held is not None:
            found = _collect(lambda: _check_rows(held, ctx, resolve_dataset(held.dataset)))
            problems += [_eval_keys(line, opts) for line in found]
        return problems

    def prepare(self, options: Any, ctx: DataContext) -> None:
        opts = as_options(HFOptions, options)
        ref = resolve_dataset(opts.dataset)
        tokenizer = load_tokenizer(opts.tokenizer)
        eos = check_tokenizer(tokenizer, ctx.vocab_size)
        explicit = _explicit_eval(opts)
        held = _pack_eval(explicit, opts, ctx, tokenizer, eos) if explicit else None
        if opts.streaming:  # larger than memory, perhaps: only its first lines are read here
            _check_rows(opts, ctx, ref)
            publish(ctx, tokenizer, None, {"streaming": True, "eval": held})
            return
        check_files(ref)  # every line: the whole split is tokenized next anyway
        share = 0.0 if explicit else opts.eval_share
        rows = load_rows(ref, opts, ctx.cache_dir)
        check_column(rows, opts.text_column, opts.dataset)
        parts = [("train", False)] + ([("eval", True)] if share else [])
        found = {}
        for part, keep_held_out in parts:
            key = content_key(
                _data_hash(ref, rows),
                opts.split,
                opts.name,
                opts.text_column,
                fingerprint(tokenizer),
                f"{part}:eval_share={share}",
            )
            out = ctx.cache_dir / "tokens" / key
            texts = _texts(rows, opts.text_column)
            meta = build_token_cache(
                split_documents(texts, share, keep_held_out=keep_held_out),
                tokenizer,
                eos,
                out,
                describe=f"{opts.dataset} ({part})",
            )
            if keep_held_out:
                found["why"] = held_out_problem(meta, ctx, share, repr(opts.dataset))
            else:
                check_enough(meta, ctx, repr(opts.dataset))
            found[part] = out
        extra = {"streaming": False, "eval": held or found.get("eval")}
        if not held and found.get("why"):  # too few held-out tokens: [eval] says why
            extra.update(eval=None, eval_problem=found["why"])
        publish(ctx, tokenizer, found["train"], extra)

    def open(self, options: Any, ctx: DataContext) -> DataStream:
        opts = as_options(HFOptions, options)
        pointer = read_pointer(ctx)
        if pointer.get("streaming"):
            return _open_stream(opts, ctx)
        return PackedStream(load_tokens(Path(pointer["tokens"])), ctx, shuffle=opts.shuffle)

    def open_eval(self, options: Any, ctx: DataContext) -> DataStream:
        opts = as_options(HFOptions, options)
        why = (
            "data.eval_split: a streaming run evaluates on eval_split or eval_dataset (set one)"
            if opts.streaming
            else "data.eval_share: 0 sets no documents aside for [eval]; set it or eval_split"
        )
        return open_held_out(ctx, why)


def _collect(check: Any) -> list[str]:
    """The problem lines `check()` raises (none if it returns)."""
    try:
        check()
    except UserError as err:
        return list(err.problems)
    return []


def _check_rows(opts: HFOptions, ctx: DataContext, ref: DatasetRef) -> None:
    """The first lines of local files decode (`prepare` reads them all), the split opens, has a
    first row, and that row has the text column (holding text)."""
    check_files(ref, max_lines=CHECK_LINES)
    rows = load_rows(ref, opts, ctx.cache_dir, streaming=True)
    try:
        first = next(iter(rows), None)
    except Exception as err:  # datasets / pyarrow decoding errors
        text = first_line(err)
        raise UserError(f"data.dataset: cannot read {opts.dataset!r}: {text}") from None
    if first is None:
        raise UserError(f"data.dataset: {opts.dataset!r} has no rows (split {opts.split!r})")
    if opts.text_column not in first:
        raise UserError(
            f"data.text_column: {opts.text_column!r} is not a column of "
            f"{opts.dataset!r} (columns: {', '.join(first)})"
        )
    if not isinstance(first[opts.text_column], str):
        kind = type(first[opts.text_column]).__name__
        raise UserError(
            f"data.text_column: {opts.text_column!r} of {opts.dataset!r} holds {kind}, not text"
        )


def _eval_keys(line: str, base: HFOptions) -> str:
    """A problem of the held-out data, named by the eval_ keys that chose it."""
    key = "data.eval_dataset" if base.eval_dataset else "data.eval_split"
    return line.replace("data.dataset", key).replace("data.split", "data.eval_split")


def _texts(rows: Any, column: str) -> Any:
    return (b[column] for b in rows.select_columns([column]).iter(batch_size=BATCH_ROWS))


def _explicit_eval(opts: HFOptions) -> HFOptions | None:
    """The options that read eval_dataset / eval_split, or None (a share is set aside)."""
    if not (opts.eval_dataset or opts.eval_split):
        return None
    dataset, split = opts.eval_dataset or opts.dataset, opts.eval_split or opts.split
    if dataset == opts.dataset and split == opts.split:
        raise UserError(
            f"data.eval_split: {split!r} of {dataset!r} is the training data; name a held-out "
            "split (e.g. validation) or eval_dataset"
        )
    return replace(
        opts, dataset=dataset, split=split, name=opts.name if not opts.eval_dataset else ""
    )


def _pack_eval(
    opts: HFOptions, base: HFOptions, ctx: DataContext, tokenizer: Any, eos: int
) -> Path:
    """Tokenize the whole held-out split into the token cache (errors name the eval_ keys)."""
    try:
        ref = resolve_dataset(opts.dataset)
        check_files(ref)
        rows = load_rows(ref, opts, ctx.cache_dir)
        check_column(rows, opts.text_column, opts.dataset)
        key = content_key(
            _data_hash(ref, rows), opts.split, opts.name, opts.text_column, fingerprint(tokenizer)
        )
        out = ctx.cache_dir / "tokens" / key
        meta = build_token_cache(
            _texts(rows, opts.text_column), tokenizer, eos, out, describe=f"{opts.dataset} (eval)"
        )
        check_enough(meta, ctx, repr(opts.dataset))
    except UserError as err:
        raise UserError([_eval_keys(p, base) for p in err.problems]) from None
    return out


def _data_hash(ref: DatasetRef, rows: Any) -> str:
    """Content hash of local files; the hub dataset's own fingerprint of its cached files."""
    if ref.is_hub:
        return f"hub:{ref.value}:{getattr(rows, '_fingerprint', '')}"
    return "\n".join(f"{p.name}:{hash_file(p)}" for p in ref.files)


def _open_stream(opts: HFOptions, ctx: DataContext) -> StreamingStream:
    from transformers import AutoTokenizer

    ref = resolve_dataset(opts.dataset)
    tokenizer = AutoTokenizer.from_pretrained(str(ctx.run_dir / "tokenizer"))
    return StreamingStream(
        lambda: load_rows(ref, opts, ctx.cache_dir, streaming=True),
        opts.text_column,
        tokenizer,
        ctx,
        describe=opts.dataset,
    )
