"""Tokenizers: load a Hugging Face one (hub id or folder), or train a byte-level BPE offline.

Every source ends with a `PreTrainedTokenizerFast`-compatible tokenizer whose vocabulary fits the
model's embedding (`model.vocab_size`) and which has an EOS token to join documents with.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
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

KEY = "data.tokenizer"
EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|im_start|>", "<|im_end|>"]  # SmolLM's chat tokens
BYTE_LEVEL_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def load_tokenizer(value: str) -> Any:
    """A transformers tokenizer from a local folder or a hub id; UserError naming data.tokenizer."""
    from transformers import AutoTokenizer

    if not value:
        raise UserError(f"{KEY}: required (a hub id or a local folder with tokenizer.json)")
    path = Path(value).expanduser()
    if path.is_dir():
        return _load(AutoTokenizer, str(path), f"folder {value!r}", local_only=True)
    if path.exists() or not looks_like_hub_id(value):
        raise UserError(f"{KEY}: folder not found: {value!r}")
    offline = hub_offline()
    if not offline:
        require_hub(KEY, value)
    try:
        return AutoTokenizer.from_pretrained(value, local_files_only=offline)
    except (OSError, ValueError) as err:
        if offline:
            raise offline_error(KEY, value, "tokenizer folder") from None
        raise UserError(f"{KEY}: cannot load {value!r}: {first_line(err)}") from None


def _load(auto: Any, where: str, what: str, *, local_only: bool) -> Any:
    try:
        return auto.from_pretrained(where, local_files_only=local_only)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"{KEY}: cannot load a tokenizer from {what}: {first_line(err)}") from None


def check_tokenizer(tokenizer: Any, model_vocab: int) -> int:
    """The EOS id, after checking that every token id fits the model's embedding."""
    size = len(tokenizer)
    if size > model_vocab:
        raise UserError(
            f"{KEY}: vocabulary of {size} tokens is larger than model.vocab_size = "
            f"{model_vocab}; use the model's own tokenizer or raise model.vocab_size"
        )
    if tokenizer.eos_token_id is None:
        raise UserError(f"{KEY}: the tokenizer has no eos_token to separate documents with")
    return int(tokenizer.eos_token_id)


def fingerprint(tokenizer: Any) -> str:
    """A content hash: same vocabulary, merges, normalisation and EOS -> same cached tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = (
        backend.to_str()
        if backend is not None
        else json.dumps(sorted(tokenizer.get_vocab().items()))
    )
    return hashlib.sha256(f"{body}\n{tokenizer.eos_token}".encode()).hexdigest()[:16]


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int) -> Any:
    """A SmolLM-style byte-level BPE trained on `texts`, with at most `vocab_size` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    assert vocab_size >= BYTE_LEVEL_MIN_VOCAB, vocab_size
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS,
        bos_token=EOS,
        unk_token=EOS,
        extra_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=1 << 30,
    )
