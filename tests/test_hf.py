"""Hugging Face interop: import sharded safetensors models of each family (LlamaForCausalLM,
Qwen3ForCausalLM) into dp2 pp2 tp2 (each rank reads its slices), train, export back, and check
against transformers' own numbers.

One spawned world of 8 trains four runs on synthetic tokens from tiny random models that
transformers saved as many small safetensors shards (with an index):

    llama-tied    tie_word_embeddings = true,  lr = 0: the weights go through unchanged
    llama-untied  tie_word_embeddings = false, FSDP2, 2 steps
    qwen3-tied    the same two for Qwen3 (per-head q/k norms, head_dim 32 != hidden / heads)
    qwen3-untied
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from meshtrain.cli import main
from meshtrain.errors import UserError
from tests.hf_reference import SEQ_LEN, VOCAB, global_batches, hf_logits_and_loss
from tests.spawn import run_world

RTOL = 1e-5
LAYOUT = [
    "parallel.dp=2",
    "parallel.pp=2",
    "parallel.tp=2",
    "train.grad_acc=2",
    "train.micro_batch_size=1",
]
# family -> its config keys beyond the shared ones. Qwen3's head_dim (32) is not hidden / heads
# (16): q_proj is 64 -> 128 and o_proj 128 -> 64.
FAMILIES = {"llama": {}, "qwen3": {"head_dim": 32}}
KINDS = {
    "tied": (True, ["train.lr=0.0", "train.steps=1", "parallel.dp_shard=false"]),
    "untied": (False, ["train.lr=1e-3", "train.steps=2", "parallel.dp_shard=true"]),
}
RUNS = {
    f"{family}-{kind}": (family, tied, overrides)
    for family in FAMILIES
    for kind, (tied, overrides) in KINDS.items()
}


def model_class(family: str) -> type:
    import transformers

    return {"llama": transformers.LlamaForCausalLM, "qwen3": transformers.Qwen3ForCausalLM}[family]


def save_hf_model(folder: Path, family: str, tied: bool) -> None:
    """A tiny random model of `family`, saved by transformers as sharded safetensors."""
    cls = model_class(family)
    torch.manual_seed(1)
    config = cls.config_class(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        **FAMILIES[family],
    )
    cls(config).save_pretrained(folder, max_shard_size="100KB")


def write_config(path: Path, folder: Path, family: str) -> Path:
    """A run config whose architecture comes only from the Hugging Face folder."""
    path.write_text(
        f'[model]\nfamily = "{family}"\nname = "{folder}"\npretrained = true\n\n'
        '[data]\nsource = "synthetic"\n\n'
        f"[train]\nseq_len = {SEQ_LEN}\nwarmup_steps = 0\n\n"
        '[checkpoint]\nevery = 1\nkeep = 5\nresume = "never"\n'
    )
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    runs = []
    for name, (family, tied, overrides) in RUNS.items():
        save_hf_model(out / f"{name}-hf", family, tied)
        config = write_config(out / f"{name}.toml", out / f"{name}-hf", family)
        runs.append((str(config), [*LAYOUT, *overrides, f'run.dir="{out / name}"']))
    results = run_world(8, runs, out)
    return out, dict(zip(RUNS, results, strict=True))


@pytest.mark.dist
@pytest.mark.parametrize("name", list(RUNS))
def test_pretrained_loss_matches_transformers(trained, name):
    out, metrics = trained
    folder = out / f"{name}-hf"
    assert (folder / "model.safetensors.index.json").is_file()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3  # really sharded
    reference = model_class(RUNS[name][0]).from_pretrained(folder)
    _, want = hf_logits_and_loss(reference, global_batches(1)[0])
    got = metrics[name][0]["loss"]
    assert abs(got - want) <= RTOL * want, f"{name}: meshtrain {got} vs transformers {want}"


@pytest.mark.dist
@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_round_trip_is_exact(trained, tmp_path, family):
    """lr = 0: HF -> per-rank slices -> DCP shards -> export -> HF leaves every logit unchanged."""
    from transformers import AutoModelForCausalLM

    out, _ = trained
    cls = model_class(family)
    exported = tmp_path / f"{family}-tied-export"
    assert main(["export", str(out / f"{family}-tied"), str(exported)]) == 0  # newest ckpt
    config = json.loads((exported / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["model_type"] == family
    assert config["architectures"] == [cls.__name__]
    assert config.get("head_dim", 16) == FAMILIES[family].get("head_dim", 16)
    assert (exported / "generation_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert type(model) is cls
    assert model.lm_head.weight is model.model.embed_tokens.weight
    batch = global_batches(1)[0]
    got, _ = hf_logits_and_loss(model, batch)
    want, _ = hf_logits_and_loss(cls.from_pretrained(out / f"{family}-tied-hf"), batch)
    assert torch.equal(got, want)


@pytest.mark.dist
@pytest.mark.parametrize("family", list(FAMILIES))
def test_exported_trained_model_matches_meshtrain(trained, tmp_path, family):
    """The untied FSDP2 run's step-1 checkpoint, exported as several shards: transformers' loss
    on the second global batch equals the loss meshtrain logged for step 2, and its logits those
    of meshtrain's own (one-stage) model read from the checkpoint."""
    from meshtrain.export import export_checkpoint, load_full_model

    out, metrics = trained
    cls = model_class(family)
    checkpoint = out / f"{family}-untied" / "checkpoints" / "step_00000001"
    exported = export_checkpoint(
        checkpoint, tmp_path / f"{family}-untied-export", max_shard_size="200KB"
    )
    assert (exported / "model.safetensors.index.json").is_file()
    model = cls.from_pretrained(exported)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    batch = global_batches(2)[1]
    logits, got = hf_logits_and_loss(model, batch)
    want = metrics[f"{family}-untied"][1]["loss"]
    assert abs(got - want) <= RTOL * want, f"exported {got} vs meshtrain step 2 {want}"
    implementation, full = load_full_model(checkpoint)
    stage = implementation.split(full, range(4), first=True, last=True, sequence_shards=1)
    with torch.no_grad():
        torch.testing.assert_close(logits, stage(batch.inputs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_load_hf_weights_reads_sharded_files_and_ties(tmp_path, family):
    """Without a process group (plain tensors): every parameter equals the saved one."""
    from meshtrain.weights import load_hf_weights

    cls = model_class(family)
    save_hf_model(tmp_path / "hf", family, tied=True)
    saved = cls.from_pretrained(tmp_path / "hf")
    model = cls(saved.config)
    model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.lm_head.weight))  # untie
    load_hf_weights(
        [model], tmp_path / "hf", {"lm_head.weight": "model.embed_tokens.weight"}, hf_keys={}
    )
    for name, value in saved.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"model\.name: .*empty has no model\.safetensors"):
        load_hf_weights([model], tmp_path / "empty", {}, hf_keys={})


def test_export_refuses_bad_sources_and_outputs(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / ".step_00000002.partial").mkdir(parents=True)
    (run / "checkpoints" / "step_00000001").mkdir()  # killed before meta.json
    out = tmp_path / "out"
    cases = [
        (tmp_path / "missing", out, "does not exist"),
        (tmp_path, out, "not a meshtrain run dir"),
        (run, out, "no complete checkpoint"),
        (run / "checkpoints" / "step_00000001", out, "incomplete checkpoint"),
    ]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    cases.append((run, tmp_path / "full", "not empty"))
    for source, target, message in cases:
        assert main(["export", str(source), str(target)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert (
            len(err) == 1
            and message in err[0]
            and str(source if message != "not empty" else target) in err[0]
        ), err
    assert not out.exists() and (tmp_path / "full" / "keep.txt").read_text() == "mine"
