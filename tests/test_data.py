"""meshtrain_data: window streams (dp slices, grad_acc, resume, epochs), synthetic and offline.

PYTHONPATH=.:plugins pytest tests/test_data.py
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import dataclasses  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import meshtrain_data  # noqa: E402
import meshtrain_data.offline  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from meshtrain_data.stream import PackedStream  # noqa: E402
from meshtrain_data.synthetic import SyntheticStream  # noqa: E402

from meshtrain.api import (  # noqa: E402
    IGNORE_INDEX,
    Batch,
    DataContext,
    DataSource,
    UserError,
    parse_section,
)


def make_ctx(tmp: Path, **kw) -> DataContext:
    base = dict(
        seq_len=8,
        micro_batch_size=2,
        grad_acc=2,
        dp=1,
        dp_rank=0,
        seed=3,
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


def global_batches(make_stream, ctx: DataContext, steps: int) -> list[Batch]:
    """Concatenate every dp rank's rows of each step into the global batch."""
    streams = [make_stream(dataclasses.replace(ctx, dp_rank=r)) for r in range(ctx.dp)]
    return [cat([s.next_batch() for s in streams]) for _ in range(steps)]


TOKENS = np.arange(8 * 13 + 5, dtype=np.uint16)  # 13 windows of 9 tokens and a short tail


def packed(ctx: DataContext) -> PackedStream:
    return PackedStream(TOKENS, ctx, shuffle=True)


def test_hook_lists_three_sources_that_fit_the_contract():
    sources = meshtrain_data.data_sources()
    assert set(sources) == {"offline", "hf", "synthetic"}
    for source in sources.values():
        assert isinstance(source, DataSource)
        options, problems = parse_section(source.config_class, {}, "x.toml: data")
        assert problems == [] and dataclasses.is_dataclass(options)
    _, problems = parse_section(sources["offline"].config_class, {"vocab_sise": 5}, "x.toml: data")
    assert problems == ["x.toml: data.vocab_sise: unknown key (did you mean data.vocab_size?)"]


def test_dp_slices_concatenate_to_the_dp1_batch(tmp_path):
    one = global_batches(packed, make_ctx(tmp_path, micro_batch_size=4, dp=1), steps=9)
    two = global_batches(packed, make_ctx(tmp_path, micro_batch_size=2, dp=2), steps=9)
    for a, b in zip(one, two, strict=True):
        assert isinstance(a, Batch)
        assert a.inputs.shape == a.labels.shape == (8, 8)
        assert a.inputs.dtype == a.labels.dtype == torch.long
        assert same(a, b)


def test_micro_batch_and_grad_acc_regrouping_keeps_the_global_batch(tmp_path):
    wide = global_batches(packed, make_ctx(tmp_path, micro_batch_size=4, grad_acc=1), steps=7)
    deep = global_batches(packed, make_ctx(tmp_path, micro_batch_size=1, grad_acc=4), steps=7)
    assert all(same(a, b) for a, b in zip(wide, deep, strict=True))


def test_windows_overlap_by_one_token_and_drop_the_short_tail(tmp_path):
    stream = PackedStream(
        TOKENS, make_ctx(tmp_path, micro_batch_size=13, grad_acc=1), shuffle=False
    )
    inputs, labels = stream.next_batch()
    assert torch.equal(inputs[:, 0], torch.arange(13) * 8)
    assert torch.equal(labels[:-1, -1], inputs[1:, 0])
    assert int(labels.max()) == 8 * 13  # tokens after the last full window are never used


def test_packed_labels_are_the_inputs_shifted_by_one(tmp_path):
    """Row r's window is inputs[r] plus one token; labels are that window less its first."""
    for inputs, labels in global_batches(packed, make_ctx(tmp_path, dp=2), steps=5):
        assert torch.equal(labels[:, :-1], inputs[:, 1:])
        assert torch.equal(inputs, labels - 1)  # TOKENS counts up by one inside a window
        assert int(inputs.min()) >= 0 and not (labels == IGNORE_INDEX).any()


def test_resume_continues_with_exactly_the_next_batch(tmp_path):
    ctx = make_ctx(tmp_path, dp=2, dp_rank=1)
    first = packed(ctx)
    for _ in range(5):
        first.next_batch()
    state = first.state_dict()
    assert all(isinstance(v, int) for v in state.values())
    second = packed(ctx)
    second.load_state_dict(state)
    for _ in range(4):
        assert same(first.next_batch(), second.next_batch())


def test_epoch_rollover_reshuffles_and_logs(tmp_path, caplog):
    stream = packed(make_ctx(tmp_path, micro_batch_size=1, grad_acc=1))
    with caplog.at_level(logging.INFO, logger="meshtrain.data"):
        epochs = [
            [stream.next_batch().inputs[0, 0].item() // 8 for _ in range(13)] for _ in range(3)
        ]
    assert all(sorted(e) == list(range(13)) for e in epochs)  # each epoch sees every window once
    assert epochs[0] != epochs[1]
    assert "epoch 1 begins" in caplog.text and "epoch 2 begins" in caplog.text
    assert stream.state_dict()["epoch"] == 3


def test_synthetic_is_seeded_layout_free_and_resumable(tmp_path):
    ctx = make_ctx(tmp_path, vocab_size=50, micro_batch_size=4, grad_acc=1)
    one = global_batches(SyntheticStream, ctx, steps=3)
    two = global_batches(SyntheticStream, dataclasses.replace(ctx, dp=2, micro_batch_size=2), 3)
    assert all(same(a, b) for a, b in zip(one, two, strict=True))
    assert torch.equal(one[0].labels[:, :-1], one[0].inputs[:, 1:])
    assert int(one[0].labels.min()) >= 0 and int(cat(one).labels.max()) < 50
    assert not same(one[0], one[1])
    stream = SyntheticStream(ctx)
    stream.next_batch()
    resumed = SyntheticStream(ctx)
    resumed.load_state_dict(stream.state_dict())
    assert same(resumed.next_batch(), one[1])
    source = meshtrain_data.data_sources()["synthetic"]
    source.prepare({}, ctx)
    assert same(source.open({}, ctx).next_batch(), one[0])


def test_synthetic_masked_share_masks_labels_alike_in_every_layout(tmp_path):
    source, options = meshtrain_data.data_sources()["synthetic"], {"masked_share": 0.25}
    ctx = make_ctx(tmp_path, seq_len=32, vocab_size=50, micro_batch_size=4, grad_acc=1)
    source.prepare(options, ctx)
    one = global_batches(lambda c: source.open(options, c), ctx, steps=3)
    dp2 = dataclasses.replace(ctx, dp=2, micro_batch_size=2)
    two = global_batches(lambda c: source.open(options, c), dp2, steps=3)
    assert all(same(a, b) for a, b in zip(one, two, strict=True))
    unmasked = global_batches(SyntheticStream, ctx, steps=3)
    for batch, plain in zip(one, unmasked, strict=True):
        hidden = batch.labels == IGNORE_INDEX
        assert hidden.any() and int(batch.inputs.min()) >= 0
        assert torch.equal(batch.inputs, plain.inputs)  # masking draws after the tokens
        assert torch.equal(batch.labels[~hidden], plain.labels[~hidden])
    share = (cat(one).labels == IGNORE_INDEX).float().mean().item()
    assert 0.15 < share < 0.35, share
    stream = source.open(options, dataclasses.replace(dp2, dp_rank=1))
    stream.next_batch()
    resumed = source.open(options, dataclasses.replace(dp2, dp_rank=1))
    resumed.load_state_dict(stream.state_dict())
    assert same(resumed.next_batch(), stream.next_batch())


def test_synthetic_masking_keeps_one_label_per_row(tmp_path):
    ctx = make_ctx(tmp_path, seq_len=2, micro_batch_size=64, grad_acc=1)
    labels = SyntheticStream(ctx, masked_share=0.99).next_batch().labels
    assert ((labels != IGNORE_INDEX).sum(dim=1) >= 1).all()


@pytest.mark.parametrize(
    ("value", "bound"), [(1.0, "must be < 1"), (1.5, "must be < 1"), (-0.1, "must be >= 0")]
)
def test_masked_share_out_of_range_is_one_line_naming_the_key(tmp_path, value, bound):
    source = meshtrain_data.data_sources()["synthetic"]
    with pytest.raises(UserError) as info:
        source.prepare({"masked_share": value}, make_ctx(tmp_path))
    assert str(info.value) == f"data.masked_share: {value!r} is out of range ({bound})"
    parsed, problems = parse_section(source.config_class, {"masked_share": value}, "data")
    if not problems:  # the core's parse_section has no upper bound: prepare still refuses
        with pytest.raises(UserError, match=r"^data\.masked_share: .*must be < 1\)$"):
            source.prepare(parsed, make_ctx(tmp_path))


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """The default source prepared once (cold) with a model vocabulary smaller than its default."""
    tmp = tmp_path_factory.mktemp("offline")
    ctx = make_ctx(tmp, seq_len=64, micro_batch_size=8, grad_acc=1, vocab_size=1000)
    start = time.perf_counter()
    meshtrain_data.data_sources()["offline"].prepare({}, ctx)
    return ctx, time.perf_counter() - start


def test_offline_default_writes_a_loadable_tokenizer_within_the_model_vocab(offline_run):
    from transformers import AutoTokenizer

    ctx, seconds = offline_run
    tokenizer = AutoTokenizer.from_pretrained(ctx.run_dir / "tokenizer")
    assert len(tokenizer) <= ctx.vocab_size
    assert tokenizer.eos_token == "<|endoftext|>"
    assert {"<|im_start|>", "<|im_end|>"} <= set(tokenizer.get_vocab())
    inputs, labels = meshtrain_data.data_sources()["offline"].open({}, ctx).next_batch()
    assert inputs.shape == labels.shape == (8, 64) and int(labels.max()) < len(tokenizer)
    assert torch.equal(labels[:, :-1], inputs[:, 1:]) and int(inputs.min()) >= 0
    text = tokenizer.decode(inputs[0])
    assert tokenizer(text, add_special_tokens=False)["input_ids"]  # real text round-trips
    assert seconds < 45, f"cold offline prepare took {seconds:.1f} s"


def test_offline_second_prepare_reuses_the_cached_tokenizer(offline_run, monkeypatch):
    ctx, _ = offline_run

    def must_not_train(*args, **kwargs):
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(meshtrain_data.offline, "train_tokenizer", must_not_train)
    meshtrain_data.data_sources()["offline"].prepare({}, ctx)
    run2 = dataclasses.replace(ctx, run_dir=ctx.run_dir.parent / "run2")
    meshtrain_data.data_sources()["offline"].prepare({}, run2)
    assert (run2.run_dir / "tokenizer" / "tokenizer.json").read_text() == (
        ctx.run_dir / "tokenizer" / "tokenizer.json"
    ).read_text()


def test_loss_falls_on_the_offline_corpus(offline_run):
    ctx, _ = offline_run
    stream = meshtrain_data.data_sources()["offline"].open({}, ctx)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(ctx.vocab_size, 64), torch.nn.Linear(64, ctx.vocab_size)
    )
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        inputs, labels = stream.next_batch()
        logits = model(inputs)  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < np.mean(losses[:5]) - 1.0, losses


def test_offline_vocab_too_small_names_the_keys(tmp_path):
    with pytest.raises(UserError, match=r"^data\.vocab_size: model\.vocab_size = 100 "):
        meshtrain_data.data_sources()["offline"].prepare({}, make_ctx(tmp_path, vocab_size=100))


def _documents(tokens: np.ndarray, eos: int) -> list[bytes]:
    """The packed documents of a token cache (each ends with EOS), as raw bytes."""
    ends = np.flatnonzero(tokens == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokens[a : b + 1].tobytes() for a, b in zip(starts, ends, strict=True)]


def test_offline_held_out_documents_are_never_trained_on(offline_run):
    """Every 50th corpus document (eval_share 0.02) is in the held-out cache and nowhere in the
    training tokens; the rest are all in the training tokens; every evaluation reads the same
    global batches whatever the dp layout."""
    import json

    from meshtrain_data.packing import held_out, load_tokens, read_pointer
    from transformers import AutoTokenizer

    ctx, _ = offline_run
    pointer = read_pointer(ctx)
    train = np.asarray(load_tokens(Path(pointer["tokens"])))
    held = np.asarray(load_tokens(Path(pointer["eval"])))
    eos = json.loads((Path(pointer["eval"]) / "meta.json").read_text())["eos"]
    tokenizer = AutoTokenizer.from_pretrained(ctx.run_dir / "tokenizer")
    corpus = next((ctx.cache_dir / "offline").glob("corpus-*.jsonl"))
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    ids = [i for i in range(len(texts)) if held_out(i, 0.02) and texts[i]]
    assert len(ids) == len(texts) // 50 > 3 and ids[0] == 49
    want = [
        np.asarray(tokenizer(texts[i], add_special_tokens=False)["input_ids"] + [eos], train.dtype)
        for i in ids
    ]
    assert _documents(held, eos) == [w.tobytes() for w in want]
    trained = train.tobytes()
    for w in sorted(want, key=len)[-5:]:  # the longest held-out documents: absent from training
        assert trained.find(w.tobytes()) == -1
    others = [i for i in range(len(texts)) if not held_out(i, 0.02) and texts[i]]
    assert len(_documents(train, eos)) == len(others)
    source = meshtrain_data.data_sources()["offline"]
    stream = source.open_eval({}, ctx)
    one = [stream.next_batch() for _ in range(2)]
    two = global_batches(
        lambda c: source.open_eval({}, c), dataclasses.replace(ctx, dp=2, micro_batch_size=4), 2
    )
    assert all(same(a, b) for a, b in zip(one, two, strict=True))
    again = source.open_eval({}, ctx).next_batch()  # a new evaluation starts from the start
    assert same(again, one[0])


def test_prefetcher_saves_the_state_of_the_last_batch_taken(tmp_path):
    """The thread runs ahead; state_dict is that after the last batch the step took, so a
    resume continues with exactly the next one; a failing stream fails the step."""
    from meshtrain.prefetch import Prefetcher

    ctx = make_ctx(tmp_path)
    data = Prefetcher(packed(ctx), depth=3)
    got = [data.next_batch() for _ in range(2)]
    time.sleep(0.2)  # let the thread fill its queue (it is ahead of the step now)
    state = data.state_dict()
    resumed = Prefetcher(packed(ctx))
    resumed.load_state_dict(state)
    direct = packed(ctx)
    want = [direct.next_batch() for _ in range(4)]
    assert all(same(a, b) for a, b in zip(got, want[:2], strict=True))
    assert same(resumed.next_batch(), want[2]) and same(data.next_batch(), want[2])
    data.close()
    resumed.close()

    class Broken:
        def next_batch(self):
            raise ValueError("bad row")

        def state_dict(self):
            return {}

    with pytest.raises(ValueError, match="bad row"):
        Prefetcher(Broken()).next_batch()
