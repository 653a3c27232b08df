"""`source = "offline"` (the default): Python's own docs and sources with a BPE trained on them.

Cache layout under `ctx.cache_dir`:

    offline/corpus-<python+settings>.jsonl   the corpus (see `corpus`)
    offline/tokenizer-<key>/                 byte-level BPE in Hugging Face format
    tokens/<key>/                            packed ids (see `packing`): training documents
    tokens/<key'>/                           the held-out documents, for [eval]

Every 1/eval_share-th document of the corpus (`packing.held_out`) is set aside for evaluation and
never trained on. The tokenizer is trained on the whole corpus.

The tokenizer key hashes the corpus content, the vocabulary size, the trainer settings and the
`tokenizers` version, so a second run reuses it instead of training again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tokenizers

from meshtrain.api import DataContext, DataStream, UserError
from meshtrain_data.dataset import DatasetRef, load_rows
from meshtrain_data.options import HFOptions, OfflineOptions, as_options
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
from meshtrain_data.tokenizer import (
    BYTE_LEVEL_MIN_VOCAB,
    SPECIAL_TOKENS,
    check_tokenizer,
    fingerprint,
    train_byte_level_bpe,
)

log = logging.getLogger("meshtrain.data")
TRAIN_CHARS = 8_000_000  # the BPE trains on this much text at most: seconds on 2 cores
TRAINER = f"byte-level-bpe;specials={','.join(SPECIAL_TOKENS)};chars={TRAIN_CHARS}"


class OfflineSource:
    """Needs no network: the corpus ships with Python, the tokenizer is trained and cached."""

    config_class = OfflineOptions

    def check(self, options: Any, ctx: DataContext) -> list[str]:
        """The vocabulary fits the model (the rest needs no files)."""
        opts = as_options(OfflineOptions, options)
        if ctx.vocab_size:
            _vocab_size(opts, ctx)
        return []

    def prepare(self, options: Any, ctx: DataContext) -> None:
        from meshtrain_data.corpus import build_corpus

        opts = as_options(OfflineOptions, options)
        vocab = _vocab_size(opts, ctx)
        corpus = build_corpus(ctx.cache_dir, opts.corpus_mb, opts.sources)
        corpus_hash = hash_file(corpus)
        tokenizer = load_or_train_tokenizer(ctx.cache_dir, corpus, corpus_hash, vocab)
        eos = check_tokenizer(tokenizer, ctx.vocab_size)
        rows = load_rows(DatasetRef(str(corpus), "json", (corpus,)), HFOptions(), ctx.cache_dir)
        found = {}
        for part, held in (("train", False), ("eval", True)):
            out = (
                ctx.cache_dir
                / "tokens"
                / content_key(
                    corpus_hash, fingerprint(tokenizer), f"{part}:eval_share={opts.eval_share}"
                )
            )
            texts = (b["text"] for b in rows.iter(batch_size=1000))
            meta = build_token_cache(
                split_documents(texts, opts.eval_share, keep_held_out=held),
                tokenizer,
                eos,
                out,
                describe=f"offline corpus ({part})",
            )
            if not held:
                check_enough(meta, ctx, "the offline corpus")
            found[part] = out
        why = held_out_problem(meta, ctx, opts.eval_share, "the offline corpus")
        extra = {"streaming": False, "eval": None if why else found["eval"], "eval_problem": why}
        publish(ctx, tokenizer, found["train"], extra)

    def open(self, options: Any, ctx: DataContext) -> DataStream:
        from meshtrain_data.stream import PackedStream  # torch: not imported for `check`

        opts = as_options(OfflineOptions, options)
        tokens = load_tokens(Path(read_pointer(ctx)["tokens"]))
        return PackedStream(tokens, ctx, shuffle=opts.shuffle)

    def open_eval(self, options: Any, ctx: DataContext) -> DataStream:
        from meshtrain_data.stream import open_held_out

        return open_held_out(ctx, "data.eval_share: 0 sets no documents aside for [eval]")


def _vocab_size(opts: OfflineOptions, ctx: DataContext) -> int:
    """min(data.vocab_size, model.vocab_size): token ids must fit the model's embedding."""
    vocab = min(opts.vocab_size, ctx.vocab_size)
    if vocab < BYTE_LEVEL_MIN_VOCAB:
        raise UserError(
            f"data.vocab_size: model.vocab_size = {ctx.vocab_size} is too small for "
            f"a byte-level tokenizer (needs >= {BYTE_LEVEL_MIN_VOCAB})"
        )
    return vocab


def load_or_train_tokenizer(cache_dir: Path, corpus: Path, corpus_hash: str, vocab: int) -> Any:
    """The cached tokenizer for this corpus and vocabulary, trained on first use."""
    from transformers import PreTrainedTokenizerFast

    key = content_key(corpus_hash, str(vocab), TRAINER, tokenizers.__version__)
    folder = cache_dir / "offline" / f"tokenizer-{key}"
    if not (folder / "tokenizer.json").is_file():
        start = time.perf_counter()
        tokenizer = train_tokenizer(_training_text(corpus), vocab)
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        tokenizer.save_pretrained(str(tmp))
        try:
            tmp.rename(folder)
        except OSError:  # another process trained the same tokenizer first
            shutil.rmtree(tmp, ignore_errors=True)
        log.info(
            "data: trained a %d-token BPE in %.1f s -> %s",
            len(tokenizer),
            time.perf_counter() - start,
            folder,
        )
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def train_tokenizer(texts: Iterator[str], vocab: int) -> Any:
    """Separate name so tests can tell whether a prepare trained or reused the tokenizer."""
    return train_byte_level_bpe(texts, vocab)


def _training_text(corpus: Path) -> Iterator[str]:
    """The corpus documents up to TRAIN_CHARS characters."""

    def documents() -> Iterator[str]:
        with open(corpus, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]

    budget = TRAIN_CHARS
    for text in documents():
        if budget <= 0:
            return
        budget -= len(text)
        yield text
