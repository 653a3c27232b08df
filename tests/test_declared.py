"""`meshtrain check` without torch: what the built-in families declare (declared_config,
stage_parameters) equals what transformers and the meta model say.

    python -m pytest -q tests/test_declared.py

For every family and a handful of layouts, the per-rank parameters and memory estimates from the
declared parameters equal those from the model built on the meta device (the fallback, and what
`check` printed before); the declared config equals transformers' config where declared_config
answers, and it answers None (parse_config's turn) where it cannot be sure. `check` itself
imports neither torch nor transformers.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from meshtrain_models import model_families
from meshtrain_models.schema import load_schema

from meshtrain.cli import toml_value
from meshtrain.config import load_config
from meshtrain.degrees import check_degrees
from meshtrain.job import Job, resolve_job
from meshtrain.layout import build_layout, count_parameters, declared_held, meta_held
from meshtrain.meta_layout import count_meta_parameters

ROOT = Path(__file__).resolve().parents[1]
SHARED = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
FAMILIES = {
    # biases on every projection; tied embedding and head
    "llama": {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True},
    # per-head q/k norms, head_dim 32 != hidden / heads
    "qwen3": {"head_dim": 32, "tie_word_embeddings": False},
    # post-norm blocks, q/k norms over the whole projection (split over tp)
    "olmo2": {"attention_bias": True, "pad_token_id": 1, "eos_token_id": 2},
    "mistral": {"sliding_window": 8},
    # q/k/v biases always, o without; tied
    "qwen2": {"tie_word_embeddings": True},
    # one key/value head: k/v replicated over tp
    "gemma": {"num_key_value_heads": 1, "head_dim": 32},
    # fused [Q | K | V] and [gate | up]; its default pad id 32000 must fit the vocabulary
    "phi3": {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1},
    "gpt_neox": {"rotary_pct": 0.25, "num_key_value_heads": None, "attention_bias": False},
    # layers 1 and 3 mixtures of experts, 0 and 2 dense
    "qwen3_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "decoder_sparse_step": 2,
    },
    "mixtral": {"num_local_experts": 4, "tie_word_embeddings": True},
}
LAYOUTS = {
    "one rank": [],
    "pp2": ["parallel.pp=2"],
    "tp2": ["parallel.tp=2"],
    "dp2 pp2 tp2 fsdp": [
        "parallel.dp=2",
        "parallel.pp=2",
        "parallel.tp=2",
        "parallel.dp_shard=true",
    ],
    "dp2 tp2 sp": ["parallel.dp=2", "parallel.tp=2", "parallel.sequence_parallel=true"],
    "pp2 V": ["parallel.pp=2", 'pipeline.schedule="zbv"'],  # rank 0: first and last stage
}
SCHEMA_MATCHES = pytest.mark.skipif(
    load_schema() is None,
    reason="schema.json describes another transformers (test_schema_is_the_installed_transformers)",
)
ARGS = {"name": None, "trust_remote_code": False, "where": "t.toml: model"}
MOE = ("qwen3_moe", "mixtral")
MOE_LAYOUTS = {
    "dp2 ep2": ["parallel.dp=2", "parallel.ep=2"],
    "dp4 ep2 tp2 fsdp": [
        "parallel.dp=4",
        "parallel.ep=2",
        "parallel.tp=2",
        "parallel.dp_shard=true",
    ],
}


def write_config(folder: Path, family: str, **options) -> Path:
    model = {k: v for k, v in {**SHARED, **FAMILIES[family], **options}.items() if v is not None}
    lines = [f"{k} = {toml_value(v)}" for k, v in model.items()]
    path = folder / f"{family}.toml"
    path.write_text(
        f'[model]\nfamily = "{family}"\n' + "\n".join(lines) + "\n\n"
        '[data]\nsource = "synthetic"\n\n[train]\nseq_len = 32\ngrad_acc = 4\n'
    )
    return path


def with_layout(job: Job, path: Path, overrides: list[str]) -> Job:
    """`job` in another layout (resolve_job's own degree checks, without loading the plugins
    and parsing the model again)."""
    config = load_config(path, overrides)
    schedule = job.plugins.get("pipeline_schedules", config.pipeline.schedule, "schedule")
    assert check_degrees(config, job.shape, schedule) == [], overrides
    return dataclasses.replace(job, config=config, schedule=schedule)


@pytest.mark.parametrize("family", FAMILIES)
def test_declared_parameters_are_the_meta_models(tmp_path, family):
    """Per rank: the same parameters and memory estimate from the declared parameters as from
    the meta model and its StagePlans, in every layout (so `check` prints what it printed)."""
    path = write_config(tmp_path, family)
    declared_job = resolve_job(load_config(path), declared=True)
    parsed_job = resolve_job(load_config(path))
    if load_schema() is not None:  # else parse_config answers: the counts must agree all the same
        assert type(declared_job.model_config).__name__ == "DeclaredConfig", family
    assert declared_job.shape == parsed_job.shape, family
    for name, overrides in {**LAYOUTS, **(MOE_LAYOUTS if family in MOE else {})}.items():
        declared, parsed = (with_layout(job, path, overrides) for job in (declared_job, parsed_job))
        want = build_layout(parsed, meta_held)
        assert build_layout(declared, declared_held) == want, (family, name)
        assert build_layout(parsed, declared_held) == want, (family, name)
        assert count_parameters(declared) == count_meta_parameters(parsed)


@pytest.mark.parametrize("family", FAMILIES)
def test_declared_parameters_name_each_stage_parameter(tmp_path, family):
    """Parameter by parameter: the names, shapes, tp dims, expert flags and FSDP units of a
    stage's declared parameters are those of the meta stage and its StagePlan."""
    from meshtrain.tensor_parallel import shard_dims

    job = resolve_job(load_config(write_config(tmp_path, family)))
    with torch.device("meta"):
        model = job.family.build(job.model_config)
    tied = {copy for _, copy in job.family.tied_parameters(job.model_config)}
    for layers, first, last in [(range(0, 4), True, True), (range(1, 3), False, False)]:
        stage = job.family.split(model, layers, first=first, last=last, sequence_shards=1)
        for tp, sp in [(1, False), (2, False), (2, True)]:
            plan = job.family.plan(stage, sequence_parallel=sp)
            names = {id(p): n for n, p in stage.named_parameters()}
            dims = {
                names[id(module.get_parameter(name))]: dim
                for path, style in plan.tp.items()
                for module in [stage.get_submodule(path)]
                for name, dim in shard_dims(module, style, tp).items()
            }
            units = {
                n: path
                for path in plan.fsdp_units
                for n in names.values()
                if n.startswith(path + ".")
            }
            experts = {
                f"{path}.{n}" for path, style in plan.experts.items() for n in style.ep_dims()
            }
            want = {
                n: (tuple(p.shape), dims.get(n), n in experts, units.get(n, ""))
                for n, p in stage.named_parameters()
            }
            specs = job.family.stage_parameters(
                job.model_config, layers, first=first, last=last, tp=tp, sequence_parallel=sp
            )
            got = {
                s.name: (s.shape, s.tp_dim, s.expert, s.fsdp_unit)
                for s in specs
                if not (s.name in tied and first)  # one shared Parameter in a whole model
            }
            assert got == want, (family, layers, tp, sp)


@SCHEMA_MATCHES
@pytest.mark.parametrize("family", FAMILIES)
def test_declared_config_is_transformers_config(family):
    """Every attribute of the declared config is what transformers' config class makes of the
    same table (aliases too)."""
    family_impl = model_families()[family]
    options = {k: v for k, v in {**SHARED, **FAMILIES[family]}.items() if v is not None}
    declared, problems = family_impl.declared_config(options, **ARGS)
    parsed, _ = family_impl.parse_config(options, **ARGS)
    assert problems == [] and type(declared).__name__ == "DeclaredConfig", family
    assert declared.values() == {k: getattr(parsed, k) for k in declared.values()}
    assert declared.num_local_experts == parsed.num_local_experts if family in MOE else True


@SCHEMA_MATCHES
def test_every_shipped_config_is_declared():
    """`meshtrain check` of each configs/*.toml needs no transformers (the fast path covers
    them), and its declared config is transformers'."""
    for path in sorted((ROOT / "configs").glob("*.toml")):
        config = load_config(path)
        family = model_families()[config.model.family]
        options = dict(config.model.options)
        answer = family.declared_config(options, **ARGS)
        assert answer is not None and answer[1] == [], path.name
        parsed, _ = family.parse_config(options, **ARGS)
        assert answer[0].values() == {k: getattr(parsed, k) for k in answer[0].values()}


@SCHEMA_MATCHES
@pytest.mark.parametrize(
    ("family", "options"),
    [
        ("llama", {"rms_norm_eps": 1}),  # transformers' @strict takes no int for a float
        ("llama", {"hidden_act": "relu"}),  # only the model would find an unknown activation
        ("llama", {"initializer_range": 0.5}),  # a validator of transformers' own
        ("llama", {"head_dim": 7}),  # an odd rotary dimension
        ("llama", {"hidden_size": 66, "head_dim": 16}),  # LlamaConfig wants heads to divide it
        ("llama", {"pad_token_id": 512}),  # outside the vocabulary: the embedding refuses it
        ("phi3", {}),  # its default pad_token_id 32000 is outside the 512-token vocabulary
        ("qwen2", {"layer_types": ["full_attention"] * 4}),  # not a plain key
        ("qwen3_moe", {"num_experts": 4, "mlp_only_layers": [1]}),
        ("llama", {"num_attention_heads": 0}),
    ],
)
def test_declared_config_leaves_what_it_cannot_vouch_for_to_transformers(family, options):
    assert model_families()[family].declared_config({**SHARED, **options}, **ARGS) is None


@SCHEMA_MATCHES
@pytest.mark.parametrize(
    "options",
    [
        {"hidden_sise": 64},  # unknown key, with the nearest one
        {"hidden_size": 64.0, "tie_word_embeddings": 1},  # wrong types
        {"hidden_size": 66},  # not divisible by the heads
        {"num_experts": 2, "num_experts_per_tok": 4},  # meshtrain's own MoE check
    ],
)
def test_declared_config_reports_parse_configs_problems(options):
    family = model_families()["mixtral" if "num_experts" in options else "llama"]
    declared = family.declared_config({**SHARED, **options}, **ARGS)
    assert declared == family.parse_config({**SHARED, **options}, **ARGS)
    assert declared[0] is None and declared[1]


def test_declared_config_waits_for_a_model_name():
    """A config.json (a folder or the hub) goes to transformers."""
    family = model_families()["llama"]
    assert family.declared_config(SHARED, **{**ARGS, "name": "some/model"}) is None


def test_schema_is_the_installed_transformers():
    """The schema `check` reads describes the transformers this runs with: schema.json where it
    names that version (regenerate: python -m meshtrain_models.schema), else the cached one."""
    from meshtrain_models.schema import build_schema

    assert load_schema() == json.loads(json.dumps(build_schema()))


def test_another_transformers_is_described_once_and_cached(tmp_path, monkeypatch):
    """A transformers release schema.json does not name: the first load describes it and caches
    that in $MESHTRAIN_CACHE/schema/; the next load reads the file without describing again."""
    from meshtrain_models import schema

    real_version = schema.importlib.metadata.version
    monkeypatch.setenv("MESHTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(
        schema.importlib.metadata,
        "version",
        lambda name: "0.0.other" if name == "transformers" else real_version(name),
    )
    schema.load_schema.cache_clear()
    try:
        first = schema.load_schema()
        cached = tmp_path / "schema" / "transformers-0.0.other.json"
        assert first["transformers"] == "0.0.other" and json.loads(cached.read_text()) == first
        assert set(first["configs"]) == set(json.loads(schema.SCHEMA.read_text())["configs"])

        def fail() -> None:
            raise AssertionError("described again instead of read from the cache")

        monkeypatch.setattr(schema, "build_schema", fail)
        schema.load_schema.cache_clear()
        assert schema.load_schema() == first
        family = model_families()["llama"]
        assert type(family.declared_config(SHARED, **ARGS)[0]).__name__ == "DeclaredConfig"
    finally:
        schema.load_schema.cache_clear()


def test_a_family_without_declared_parameters_is_counted_on_the_meta_model(tmp_path):
    """The fallback: a third-party family that declares neither stage_parameters nor
    declared_config is parsed by parse_config and counted from its meta model."""
    sys.path.insert(0, str(ROOT / "tests" / "thirdparty"))
    try:
        import tinymlp_family
    finally:
        sys.path.pop(0)
    path = tmp_path / "tiny.toml"
    path.write_text(
        '[model]\nfamily = "tinymlp"\n[data]\nsource = "synthetic"\n[train]\nseq_len = 32\n'
    )
    config = load_config(path, ["parallel.pp=2", "parallel.tp=2", "train.grad_acc=2"])
    job = resolve_job(config, [tinymlp_family], declared=True)
    assert not hasattr(job.family, "stage_parameters")
    assert build_layout(job) == build_layout(job, meta_held)
    assert count_parameters(job) == sum(
        p.numel() for p in job.family.build(job.model_config).parameters()
    )


@SCHEMA_MATCHES
def test_check_imports_neither_torch_nor_transformers():
    """`meshtrain check` of the reference config reads no model code: transformers' modeling
    modules, torch.distributed.tensor, torch itself (seconds of imports) stay unloaded."""
    code = (
        "import sys\n"
        "from meshtrain.cli import main\n"
        f"assert main(['check', {str(ROOT / 'configs' / 'smollm_cpu.toml')!r}]) == 0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert result.stdout.splitlines()[-1] == "[]", result.stdout.splitlines()[-1][:2000]
