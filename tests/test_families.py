"""The families beyond LLaMA and Qwen3 (meshtrain_models: mistral, qwen2, gemma, olmo2, phi3),
each over its transformers class, against transformers' own numbers.

Without a process group: split stages compute what the transformers model computes (Mistral's
and Phi-3's sliding window shorter than the sequence, Qwen2's biases and sliding layers, Gemma's
scaled embedding and (1 + w) norms), the init is transformers' `_init_weights`, `family = "auto"`
finds each family, unknown model types and key/value heads tp cannot use are one line, and every
configs/*.toml passes `meshtrain check`.

Spawned worlds (tiny random models that transformers saved, `family` left to "auto",
`pretrained = true`, 5 steps at lr 1e-3 on synthetic tokens, global batch 4 x 32 tokens):

    world 1   each family in one process: the reference
    world 2   Gemma (one key/value head, so k/v are replicated over tp), Phi-3, OLMo2 and
              GPT-NeoX at tp2 with sequence parallel; Mistral and Qwen2 at tp2
    world 8   each family at dp2 pp2 tp2 (1F1B, FSDP2): step 1 is transformers' loss on the same
              batch, the step-4 checkpoint exported and read by `from_pretrained` gives
              meshtrain's step-5 loss; Phi-3 (fused [Q | K | V], [gate | up]) at dp2 tp4 (two
              key/value heads on four ranks)

`make parity` (MESHTRAIN_WIDE=1) adds every family at pp2 and at tp2 alone, and Qwen2 at dp2 tp4:
combinations whose parts the runs above already cover, left out of the default run for time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from meshtrain.cli import main
from tests.hf_reference import (
    GLOBAL_BATCH,
    SEQ_LEN,
    VOCAB,
    global_batches,
    hf_logits_and_loss,
    write_config,
)
from tests.spawn import WIDE, run_world

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5
STEPS = 5
SHARED = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "max_position_embeddings": 128,
}
# family -> (its transformers config keys beyond SHARED, saved as sharded safetensors)
FAMILIES = {
    # A window of 8 tokens: shorter than the 32-token sequence, so it must be applied.
    "mistral": (
        {"num_key_value_heads": 2, "sliding_window": 8, "tie_word_embeddings": False},
        True,
    ),
    # Biases on q/k/v; layers 2 and 3 slide over 8 tokens, 0 and 1 see everything.
    "qwen2": (
        {
            "num_key_value_heads": 2,
            "use_sliding_window": True,
            "sliding_window": 8,
            "max_window_layers": 2,
            "tie_word_embeddings": True,
        },
        True,
    ),
    # One key/value head (as gemma-2b) and head_dim 32 != hidden / heads; pad_token_id 0.
    "gemma": ({"num_key_value_heads": 1, "head_dim": 32, "tie_word_embeddings": True}, False),
    # Post-norm blocks; q/k RMSNorms over the whole projection (split over tp with it).
    "olmo2": (
        {
            "num_key_value_heads": 2,
            "tie_word_embeddings": False,
            "pad_token_id": VOCAB - 1,
            "eos_token_id": VOCAB - 1,
        },
        True,
    ),
    # Fused qkv_proj [Q | K | V] and gate_up_proj [gate | up]; a window of 16 tokens.
    "phi3": (
        {
            "num_key_value_heads": 2,
            "sliding_window": 16,
            "tie_word_embeddings": False,
            "pad_token_id": VOCAB - 1,
            "eos_token_id": VOCAB - 1,
        },
        True,
    ),
    # Pythia's layout: per-head fused qkv with biases, LayerNorms, parallel residual, rotary on
    # a quarter of each head (16 / 4 = 4 dims), untied head saved as embed_out.
    "gpt_neox": (
        {"rotary_pct": 0.25, "use_parallel_residual": True, "tie_word_embeddings": False},
        True,
    ),
}


def model_class(family: str) -> type:
    import transformers

    return {
        "mistral": transformers.MistralForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "gemma": transformers.GemmaForCausalLM,
        "olmo2": transformers.Olmo2ForCausalLM,
        "phi3": transformers.Phi3ForCausalLM,
        "gpt_neox": transformers.GPTNeoXForCausalLM,
    }[family]


def tiny_config(family: str, **overrides):
    return model_class(family).config_class(**{**SHARED, **FAMILIES[family][0], **overrides})


def random_model(family: str, **overrides) -> torch.nn.Module:
    """A tiny transformers model whose norms and biases are random too (transformers starts them
    at 1 or 0, which would hide a wrongly split bias or a norm read as w instead of 1 + w)."""
    torch.manual_seed(1)
    model = model_class(family)(tiny_config(family, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", ".bias")):
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def save_hf_model(folder: Path, family: str) -> Path:
    sharded = FAMILIES[family][1]
    random_model(family).save_pretrained(folder, max_shard_size="100KB" if sharded else "50MB")
    return folder


# ---------------------------------------------------------------- without a process group


def family_of(name: str):
    from meshtrain_models import model_families

    return model_families()[name]


def parse(family: str, options: dict, name: str | None = None):
    return family_of(family).parse_config(
        options, name=name, trust_remote_code=False, where="t.toml: model"
    )


def test_worker_imports_hold_the_model_code():
    """What a family declares for the forkserver to preload holds its transformers model class
    and the family's own layout module, so no worker imports them after the fork."""
    import sys

    for name in FAMILIES:
        family = family_of(name)
        declared = set(family.worker_imports)
        assert family.spec.model_class.__module__ in declared, name
        assert type(family._family).__module__ in declared, name
        assert all(module in sys.modules for module in declared), name


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("num_stages", [1, 3])
def test_split_stages_equal_transformers(family, num_stages):
    """Stages in a row give transformers' logits (sliding window, biases, scaled embedding and
    (1 + w) norms included): sdpa, the window mask built by the stage."""
    from meshtrain.pipeline import partition_layers

    reference = random_model(family)
    impl = family_of(family)
    config, problems = parse(family, {**SHARED, **FAMILIES[family][0]})
    assert problems == []
    model = impl.build(config)
    model.load_state_dict(reference.state_dict())
    ranges = partition_layers(4, num_stages)
    stages = [
        impl.split(model, r, first=i == 0, last=i == num_stages - 1, sequence_shards=1).eval()
        for i, r in enumerate(ranges)
    ]
    ids = torch.randint(0, VOCAB, (2, SEQ_LEN))
    x = ids
    with torch.no_grad():
        for stage in stages:
            x = stage(x)
        want = reference(ids).logits
    torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-5)
    if "sliding_window" in FAMILIES[family][0]:  # the window matters: without it they differ
        unmasked = model_class(family)(
            tiny_config(family, sliding_window=None, use_sliding_window=False)
        ).eval()
        unmasked.load_state_dict(reference.state_dict())
        with torch.no_grad():
            assert not torch.allclose(unmasked(ids).logits, want, atol=1e-3)


def test_gpt_neox_sequential_residual_and_pythia_config_keys(tmp_path):
    """The sequential residual (use_parallel_residual = false) splits like the parallel one, and
    a Pythia config.json's own names (rotary_pct, rotary_emb_base) reach the rotary embedding."""
    from meshtrain.pipeline import partition_layers

    folder = tmp_path / "pythia"
    folder.mkdir()
    pythia = {**SHARED, "model_type": "gpt_neox", "rotary_pct": 0.5, "rotary_emb_base": 500}
    (folder / "config.json").write_text(json.dumps({**pythia, "use_parallel_residual": False}))
    config, problems = parse("gpt_neox", {}, name=str(folder))
    assert problems == []
    assert config.rope_parameters["partial_rotary_factor"] == 0.5
    assert config.rope_parameters["rope_theta"] == 500
    assert config.use_parallel_residual is False
    rotary_dims = 16 // 2  # head_dim 16, half of it rotated
    inv_freq = 1.0 / 500 ** (torch.arange(0, rotary_dims, 2).float() / rotary_dims)
    impl = family_of("gpt_neox")
    model = impl.build(config)
    torch.testing.assert_close(model.gpt_neox.rotary_emb.inv_freq, inv_freq)
    reference = random_model(
        "gpt_neox", use_parallel_residual=False, rotary_pct=0.5, rotary_emb_base=500
    )
    model.load_state_dict(reference.state_dict())
    stages = [
        impl.split(model, r, first=i == 0, last=i == 1, sequence_shards=1).eval()
        for i, r in enumerate(partition_layers(4, 2))
    ]
    ids = torch.randint(0, VOCAB, (2, SEQ_LEN))
    with torch.no_grad():
        got = stages[1](stages[0](ids))
        torch.testing.assert_close(got, reference(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_init_is_transformers_init(family):
    """init_parameter: what transformers' `_init_weights` sets exactly (norm weights 1, Gemma's
    0, zero biases and padding row) and N(0, initializer_range) for the rest."""
    impl = family_of(family)
    config = tiny_config(family, initializer_range=0.05, pad_token_id=3)
    torch.manual_seed(0)
    reference = model_class(family)(config)
    for name, want in reference.state_dict().items():
        generator = torch.Generator().manual_seed(0)
        got = impl.init_parameter(name, want.shape, config, generator)
        if want.unique().numel() == 1:  # a constant: exactly transformers'
            assert torch.equal(got, want), name
            continue
        if name == "model.embed_tokens.weight":
            assert torch.equal(got[3], want[3]) and not want[3].any()
            got, want = torch.cat([got[:3], got[4:]]), torch.cat([want[:3], want[4:]])
        assert abs(float(got.mean())) < 0.01 and abs(float(want.mean())) < 0.01, name
        assert math.isclose(float(got.std()), float(want.std()), rel_tol=0.1), name
        assert math.isclose(float(want.std()), 0.05, rel_tol=0.1), name
    if family == "gemma":
        assert not reference.model.norm.weight.any()  # (1 + w): transformers starts at 0
    if family == "qwen2":
        assert reference.model.layers[0].self_attn.k_proj.bias is not None
    if family == "gpt_neox":  # LayerNorm biases start at 0, weights at 1
        norm = reference.gpt_neox.layers[0].input_layernorm
        assert not norm.bias.any() and bool((norm.weight == 1).all())


def test_key_value_heads_tp_may_divide_or_be_a_multiple(tmp_path, capsys):
    """One key/value head trains at any tp that divides the query heads; 3 at tp 2 is one line
    naming model.num_key_value_heads."""
    shape = family_of("gemma").shape(tiny_config("gemma"))
    assert shape.tp_divisible_or_multiple == {"model.num_key_value_heads": 1}
    assert "model.num_key_value_heads" not in shape.tp_divisible
    path = tmp_path / "kv3.toml"
    path.write_text(
        '[model]\nfamily = "gemma"\nhidden_size = 96\nintermediate_size = 64\n'
        "num_hidden_layers = 2\nnum_attention_heads = 6\nnum_key_value_heads = 3\nhead_dim = 16\n"
        "vocab_size = 512\n\n[parallel]\ntp = 2\n"
    )
    assert main(["check", str(path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "parallel.tp: 2 does not divide model.num_key_value_heads (3) nor is" in line, line


def test_check_counts_one_key_value_head_as_replicated(tmp_path):
    """`meshtrain check` at tp 2: k_proj and v_proj (one head) are whole on each rank."""
    from meshtrain.config import load_config
    from meshtrain.job import resolve_job
    from meshtrain.layout import build_layout

    folder = tmp_path / "gemma"
    tiny_config("gemma").save_pretrained(folder)
    config = write_config(tmp_path / "gemma.toml", folder)
    rows = build_layout(
        resolve_job(load_config(config, ["parallel.tp=2", "model.pretrained=false"]))
    )
    split = ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens")
    want = sum(
        p.numel() // (2 if any(s in name for s in split) else 1)
        for name, p in random_model("gemma").named_parameters()
    )
    assert [row.params for row in rows] == [want, want]


def test_auto_picks_each_family_from_its_folder(tmp_path):
    from meshtrain.config import load_config
    from meshtrain.job import resolve_job

    for family in FAMILIES:
        folder = tmp_path / family
        tiny_config(family).save_pretrained(folder)
        job = resolve_job(load_config(write_config(tmp_path / f"{family}.toml", folder)))
        assert job.family_name == family and type(job.model_config) is type(tiny_config(family))


def test_unknown_model_type_is_one_line_naming_model_name(tmp_path, capsys):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    assert main(["check", str(write_config(tmp_path / "bert.toml", folder))]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "model.name" in line and "'bert'" in line, line


@pytest.mark.parametrize("config", sorted(ROOT.glob("configs/*.toml")), ids=lambda p: p.name)
def test_every_config_passes_check(config, capsys):
    assert main(["check", str(config)]) == 0, capsys.readouterr().err


# ---------------------------------------------------------------- spawned worlds


def layout(dp: int = 1, pp: int = 1, tp: int = 1, sp: bool = False) -> list[str]:
    return [
        f"parallel.dp={dp}",
        f"parallel.pp={pp}",
        f"parallel.tp={tp}",
        f"parallel.dp_shard={str(dp > 1).lower()}",
        f"parallel.sequence_parallel={str(sp).lower()}",
        f"train.micro_batch_size={GLOBAL_BATCH // (dp * 2)}",
    ]


SP = ("gemma", "phi3", "olmo2", "gpt_neox")
RUNS = {  # (family, run) -> overrides; the world is dp * pp * tp
    **{(f, "one"): layout() for f in FAMILIES},
    # pp2 alone, and tp2 alone where tp2 with sequence parallel runs: `make parity` only.
    **{(f, "pp2"): layout(pp=2) for f in FAMILIES if WIDE},
    **{(f, "tp2"): layout(tp=2) for f in FAMILIES if WIDE or f not in SP},
    ("gemma", "tp2-sp"): layout(tp=2, sp=True),
    ("phi3", "tp2-sp"): layout(tp=2, sp=True),
    ("olmo2", "tp2-sp"): layout(tp=2, sp=True),
    ("gpt_neox", "tp2-sp"): layout(tp=2, sp=True),
    **{
        (f, "dp2-pp2-tp2"): [*layout(2, 2, 2), "checkpoint.every=4", "checkpoint.keep=2"]
        for f in FAMILIES
    },
    **({("qwen2", "dp2-tp4"): layout(dp=2, tp=4)} if WIDE else {}),
    ("phi3", "dp2-tp4"): layout(dp=2, tp=4),
}
CASES = [key for key in RUNS if key[1] != "one"]


def world_of(overrides: list[str]) -> int:
    return math.prod(int(o.split("=")[1]) for o in overrides[:3])


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """(family, run) -> (per-step metrics, run dir, Hugging Face folder); one world per size."""
    out = tmp_path_factory.mktemp("families")
    configs = {
        f: write_config(out / f"{f}.toml", save_hf_model(out / f"{f}-hf", f), STEPS)
        for f in FAMILIES
    }
    found = {}
    for world in sorted({world_of(o) for o in RUNS.values()}):
        keys = [k for k, o in RUNS.items() if world_of(o) == world]
        runs = [(str(configs[f]), [*RUNS[(f, r)], f'run.dir="{out / f / r}"']) for f, r in keys]
        for (f, r), history in zip(keys, run_world(world, runs, out), strict=True):
            found[(f, r)] = (history, out / f / r, out / f"{f}-hf")
    return found


@pytest.mark.dist
@pytest.mark.parity
@pytest.mark.parametrize(("family", "run"), CASES, ids=[f"{f}-{r}" for f, r in CASES])
def test_layout_matches_one_process(worlds, family, run):
    reference, got = worlds[(family, "one")][0], worlds[(family, run)][0]
    assert len(got) == len(reference) == STEPS
    assert all(m["grad_norm"] > 0 for m in reference)  # lr 1e-3: the weights move every step
    for ref, step in zip(reference, got, strict=True):
        for key in ("loss", "grad_norm"):
            assert abs(step[key] - ref[key]) <= RTOL * abs(ref[key]), (
                f"{family} {run} step {ref['step']}: {key} {step[key]} vs {ref[key]}"
            )


@pytest.mark.dist
@pytest.mark.parametrize("family", list(FAMILIES))
def test_pretrained_first_step_is_transformers_loss(worlds, family):
    history, _, folder = worlds[(family, "dp2-pp2-tp2")]
    if FAMILIES[family][1]:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 3  # really sharded
    reference = model_class(family).from_pretrained(folder)
    batch = global_batches(1)[0]
    if family == "gemma":  # step 1 looks up the padding row, which no layout may give a gradient
        assert reference.config.pad_token_id == 0 and (batch.inputs == 0).any()
    _, want = hf_logits_and_loss(reference, batch)
    got = history[0]["loss"]
    assert abs(got - want) <= RTOL * want, f"{family}: meshtrain {got} vs transformers {want}"


@pytest.mark.dist
@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_of_trained_model_gives_meshtrain_numbers(worlds, tmp_path, family):
    """The step-4 checkpoint exported: `from_pretrained` gives meshtrain's step-5 loss, and the
    logits of meshtrain's own one-stage model read from the checkpoint."""
    from transformers import AutoModelForCausalLM

    from meshtrain.export import export_checkpoint, load_full_model

    history, run_dir, _ = worlds[(family, "dp2-pp2-tp2")]
    checkpoint = run_dir / "checkpoints" / "step_00000004"
    exported = export_checkpoint(checkpoint, tmp_path / "export", max_shard_size="200KB")
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == family
    assert config["architectures"] == [model_class(family).__name__]
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert type(model) is model_class(family)
    tied = FAMILIES[family][0]["tie_word_embeddings"]
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    batch = global_batches(5)[4]
    logits, got = hf_logits_and_loss(model, batch)
    want = history[4]["loss"]
    assert abs(got - want) <= RTOL * want, f"exported {got} vs meshtrain step 5 {want}"
    implementation, full = load_full_model(checkpoint)
    stage = implementation.split(full, range(4), first=True, last=True, sequence_shards=1)
    with torch.no_grad():
        torch.testing.assert_close(logits, stage(batch.inputs), rtol=1e-5, atol=1e-6)
