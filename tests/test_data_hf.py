"""meshtrain_data `source = "hf"`: local txt/jsonl/parquet, caching, streaming, one-line errors.

PYTHONPATH=.:plugins pytest tests/test_data_hf.py
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import meshtrain_data.packing  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from meshtrain_data.hf import HFSource  # noqa: E402
from meshtrain_data.tokenizer import train_byte_level_bpe  # noqa: E402

from meshtrain.api import Batch, DataContext, UserError  # noqa: E402

DOCS = [
    f"Document {i}: the quick brown fox jumps over {i} lazy dogs. " * (1 + i % 3) for i in range(40)
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A tiny byte-level BPE (300 tokens) saved the Hugging Face way."""
    folder = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_byte_level_bpe(iter(DOCS), 300).save_pretrained(str(folder))
    return folder


def make_ctx(tmp: Path, **kw) -> DataContext:
    base = dict(
        seq_len=16,
        micro_batch_size=2,
        grad_acc=2,
        dp=1,
        dp_rank=0,
        seed=1,
        vocab_size=1000,
        run_dir=tmp / "run",
        cache_dir=tmp / "cache",
    )
    return DataContext(**{**base, **kw})


def cat(batches: list[Batch]) -> Batch:
    """Row-wise concatenation, field by field (dp ranks' rows -> the global batch)."""
    return Batch(*(torch.cat(part) for part in zip(*batches, strict=True)))


def same(a: Batch, b: Batch) -> bool:
    return torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)


def write_jsonl(path: Path, docs: list[str], column: str = "text") -> Path:
    path.write_text("".join(json.dumps({"id": i, column: d}) + "\n" for i, d in enumerate(docs)))
    return path


def write_dataset(tmp: Path, kind: str) -> tuple[Path, str]:
    if kind == "txt":
        path = tmp / "corpus.txt"
        path.write_text("\n\n".join(DOCS))
        return path, "text"
    if kind == "jsonl":
        return write_jsonl(tmp / "corpus.jsonl", DOCS, "body"), "body"
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp / "corpus.parquet"
    pq.write_table(pa.table({"content": DOCS, "n": list(range(len(DOCS)))}), path)
    return path, "content"


def prepare_and_open(tmp: Path, options: dict, **ctx_kw) -> tuple[HFSource, DataContext, dict]:
    ctx = make_ctx(tmp, **ctx_kw)
    source = HFSource()
    source.prepare(options, ctx)
    return source, ctx, options


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_local_formats_pack_windows_of_seq_len_plus_one(tmp_path, tokenizer_dir, kind):
    from transformers import AutoTokenizer

    path, column = write_dataset(tmp_path, kind)
    options = {"dataset": str(path), "text_column": column, "tokenizer": str(tokenizer_dir)}
    source, ctx, _ = prepare_and_open(tmp_path, options)
    inputs, labels = source.open(options, ctx).next_batch()
    assert inputs.shape == labels.shape == (4, 16)
    assert inputs.dtype == labels.dtype == torch.long
    assert torch.equal(labels[:, :-1], inputs[:, 1:]) and int(inputs.min()) >= 0
    saved = AutoTokenizer.from_pretrained(ctx.run_dir / "tokenizer")
    assert len(saved) == 300 and int(labels.max()) < 300
    assert "lazy dogs" in saved.decode(torch.cat(list(inputs)))


def test_glob_dp_slices_and_resume_through_the_source(tmp_path, tokenizer_dir):
    write_jsonl(tmp_path / "a.jsonl", DOCS[:20])
    write_jsonl(tmp_path / "b.jsonl", DOCS[20:])
    options = {"dataset": str(tmp_path / "*.jsonl"), "tokenizer": str(tokenizer_dir)}
    source, ctx, _ = prepare_and_open(tmp_path, options)
    whole = source.open(options, ctx)
    halves = [
        source.open(options, dataclasses.replace(ctx, dp=2, dp_rank=r, grad_acc=1))
        for r in range(2)
    ]
    for _ in range(30):  # well past one epoch of this small corpus
        assert same(whole.next_batch(), cat([h.next_batch() for h in halves]))
    resumed = source.open(options, ctx)
    resumed.load_state_dict(json.loads(json.dumps(whole.state_dict())))
    assert same(resumed.next_batch(), whole.next_batch())


def test_second_prepare_reuses_the_token_cache(tmp_path, tokenizer_dir, monkeypatch):
    path, column = write_dataset(tmp_path, "jsonl")
    options = {"dataset": str(path), "text_column": column, "tokenizer": str(tokenizer_dir)}
    source, ctx, _ = prepare_and_open(tmp_path, options)
    first = source.open(options, ctx).next_batch()

    def must_not_tokenize(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(meshtrain_data.packing, "encode_documents", must_not_tokenize)
    source.prepare(options, ctx)
    assert same(source.open(options, ctx).next_batch(), first)
    assert len(list((ctx.cache_dir / "tokens").iterdir())) == 2  # training and held-out


def streaming_corpus(tmp: Path, files: int, per_file: int) -> Path:
    """A folder of jsonl files; document i says its own number (so each text is unique)."""
    folder = tmp / "corpus"
    folder.mkdir(parents=True)
    for f in range(files):
        docs = [DOCS[i % len(DOCS)].replace("Document", f"Doc {f}.{i}") for i in range(per_file)]
        write_jsonl(folder / f"part{f:02d}.jsonl", docs)
    return folder


class CountingTokenizer:
    """Wraps a tokenizer and records every text it encodes."""

    def __init__(self, inner):
        self.inner, self.texts = inner, []

    def __call__(self, texts, **kwargs):
        self.texts += list(texts)
        return self.inner(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def open_streams(source, options, ctx, dp: int) -> list:
    """Every dp rank's stream at the global batch of `ctx` (4 rows), tokenizers counted."""
    streams = []
    for rank in range(dp):
        rows = 4 // dp
        grad_acc = 2 if rows >= 2 else 1
        rank_ctx = dataclasses.replace(
            ctx, dp=dp, dp_rank=rank, micro_batch_size=rows // grad_acc, grad_acc=grad_acc
        )
        stream = source.open(options, rank_ctx)
        stream.tokenizer = CountingTokenizer(stream.tokenizer)
        streams.append(stream)
    return streams


def test_streaming_reads_each_document_once_and_batches_do_not_depend_on_dp(
    tmp_path, tokenizer_dir
):
    """A folder of jsonl files at dp 1, 2 and 4 (global batch 4 rows): the same global batches;
    the dp ranks tokenize disjoint documents that together are every document read."""
    folder = streaming_corpus(tmp_path, files=3, per_file=40)
    options = {"dataset": str(folder), "tokenizer": str(tokenizer_dir), "streaming": True}
    source, ctx, _ = prepare_and_open(tmp_path / "s", options, micro_batch_size=2, grad_acc=2)
    runs = {dp: open_streams(source, options, ctx, dp) for dp in (1, 2, 4)}
    batches = {
        dp: [cat([s.next_batch() for s in streams]) for _ in range(6)]
        for dp, streams in runs.items()
    }
    for dp in (2, 4):
        assert all(same(a, b) for a, b in zip(batches[1], batches[dp], strict=True)), dp
    assert batches[1][0].inputs.shape == (4, 16)
    for dp, streams in runs.items():
        texts = [t for s in streams for t in s.tokenizer.texts]
        assert len(texts) == len(set(texts)) == 120, dp  # every document once, in all
        per_rank = [len(s.tokenizer.texts) for s in streams]
        assert per_rank == [120 // dp] * dp, per_rank  # a 1/dp share each


def test_streaming_resumes_without_reading_again_and_in_another_layout(tmp_path, tokenizer_dir):
    """Resumed at step 3 (same layout): the next batches are the uninterrupted run's and the
    reader starts at the saved place (no document tokenized twice). From dp2 into dp1: the same
    batches too (re-read to the saved place). Memory: the lanes' queues stay about a chunk of
    documents while the corpus is 10x the tokens read."""
    folder = streaming_corpus(tmp_path, files=6, per_file=600)
    options = {"dataset": str(folder), "tokenizer": str(tokenizer_dir), "streaming": True}
    source, ctx, _ = prepare_and_open(tmp_path / "s", options, micro_batch_size=2, grad_acc=2)
    full = open_streams(source, options, ctx, 2)
    states, batches, queued = [], [], []
    for step in range(8):
        if step == 3:
            states = [s.state_dict() for s in full]
        batches.append(cat([s.next_batch() for s in full]))
        queued.append(sum(len(q) for s in full for q in s.queues.values()))
    resumed = open_streams(source, options, ctx, 2)
    for stream, state in zip(resumed, states, strict=True):
        stream.load_state_dict(state)
    again = [cat([s.next_batch() for s in resumed]) for _ in range(5)]
    assert all(same(a, b) for a, b in zip(batches[3:], again, strict=True))
    seen = {t for s in full for t in s.tokenizer.texts[: len(s.tokenizer.texts) // 2]}
    assert not seen & {t for s in resumed for t in s.tokenizer.texts[:10]}
    (single,) = open_streams(source, options, ctx, 1)
    single.load_state_dict(states[0])  # rank 0's state, as a checkpoint in another layout
    assert all(same(a, single.next_batch()) for a in batches[3:5])
    tokens_read = sum(s.document for s in full) // 2 * 60  # ~60 tokens a document
    assert tokens_read * 10 < 3600 * 60  # the corpus is more than 10x what was read
    assert max(queued) < 4 * 256 * 60  # a few chunks of documents, whatever the corpus


def error_of(tmp: Path, options: dict, **ctx_kw) -> str:
    with pytest.raises(UserError) as info:
        HFSource().prepare(options, make_ctx(tmp, **ctx_kw))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_hub_id_while_offline_fails_fast_naming_the_key(tmp_path, tokenizer_dir):
    start = time.perf_counter()
    message = error_of(
        tmp_path, {"dataset": "someone/no-such-dataset", "tokenizer": str(tokenizer_dir)}
    )
    assert time.perf_counter() - start < 5
    assert message.startswith("data.dataset: 'someone/no-such-dataset'")
    assert 'source = "offline"' in message


def test_missing_file_names_the_key(tmp_path, tokenizer_dir):
    message = error_of(
        tmp_path, {"dataset": str(tmp_path / "nope.jsonl"), "tokenizer": str(tokenizer_dir)}
    )
    assert message.startswith("data.dataset: file not found:")


def test_missing_column_names_the_available_ones(tmp_path, tokenizer_dir):
    path, _ = write_dataset(tmp_path, "parquet")
    message = error_of(
        tmp_path, {"dataset": str(path), "text_column": "body", "tokenizer": str(tokenizer_dir)}
    )
    assert message.startswith("data.text_column: 'body' is not a column")
    assert "(columns: content, n)" in message


@pytest.mark.parametrize("content", ["", '{"text": ""}\n'])
def test_empty_dataset_names_the_key(tmp_path, tokenizer_dir, content):
    (tmp_path / "empty.jsonl").write_text(content)
    message = error_of(
        tmp_path, {"dataset": str(tmp_path / "empty.jsonl"), "tokenizer": str(tokenizer_dir)}
    )
    assert message.startswith("data.dataset: ")
    assert "empty" in message or "no text" in message


def test_dataset_shorter_than_one_window_names_seq_len(tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "short.jsonl", ["hi"])
    message = error_of(tmp_path, {"dataset": str(path), "tokenizer": str(tokenizer_dir)})
    assert message.startswith("data.dataset: ") and "train.seq_len" in message


def test_tokenizer_not_found_names_the_key(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", DOCS)
    message = error_of(tmp_path, {"dataset": str(path), "tokenizer": str(tmp_path / "missing")})
    assert message.startswith("data.tokenizer: folder not found")
    message = error_of(tmp_path, {"dataset": str(path), "tokenizer": "someone/no-tokenizer"})
    assert message.startswith("data.tokenizer: 'someone/no-tokenizer'")


def test_vocab_larger_than_the_model_names_both_keys(tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "d.jsonl", DOCS)
    message = error_of(
        tmp_path, {"dataset": str(path), "tokenizer": str(tokenizer_dir)}, vocab_size=256
    )
    assert message.startswith("data.tokenizer: vocabulary of 300 tokens")
    assert "model.vocab_size = 256" in message


def test_unknown_key_is_reported_with_a_suggestion(tmp_path):
    message = error_of(tmp_path, {"dataset": "x.jsonl", "text_colum": "body"})
    assert message == "data.text_colum: unknown key (did you mean data.text_column?)"


def test_too_few_held_out_documents_fail_eval_only(tmp_path, tokenizer_dir):
    """40 documents at eval_share 0.02 set none aside: training prepares and opens, [eval]'s
    stream is one line naming data.eval_share; eval_split names held-out data instead."""
    path = write_jsonl(tmp_path / "c.jsonl", DOCS)
    options = {"dataset": str(path), "tokenizer": str(tokenizer_dir)}
    source, ctx, _ = prepare_and_open(tmp_path / "a", options)
    assert source.open(options, ctx).next_batch().inputs.shape == (4, 16)
    with pytest.raises(UserError, match=r"^data\.eval_share: 0\.02 of .* is 0 documents"):
        source.open_eval(options, ctx)
    held = write_jsonl(tmp_path / "v.jsonl", DOCS[:20])
    options = {**options, "eval_dataset": str(held)}
    source, ctx, _ = prepare_and_open(tmp_path / "b", options)
    assert source.open_eval(options, ctx).next_batch().inputs.shape == (4, 16)
