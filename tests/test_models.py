"""The built-in model families (meshtrain_models: llama, qwen3): stages cover every parameter
once, the split model computes exactly what the transformers model computes, the plan covers
every block and names the units FSDP2 keeps gathered (which a world of one in this process shows
it does), and config problems name their key."""

from __future__ import annotations

import pytest
import torch
from meshtrain_models import model_families

from meshtrain.pipeline import partition_layers

FAMILIES = ("llama", "qwen3")
WHERE = "t.toml: model"
TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 5,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 97,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
# Qwen3 sets its head width apart from hidden_size / num_attention_heads (8 here).
EXTRA = {"llama": {}, "qwen3": {"head_dim": 16}}


def family_of(name: str):
    return model_families()[name]


def parse(name: str, options: dict, model_name: str | None = None):
    return family_of(name).parse_config(
        options, name=model_name, trust_remote_code=False, where=WHERE
    )


@pytest.fixture(params=FAMILIES)
def family_and_config(request):
    config, problems = parse(request.param, {**TINY, **EXTRA[request.param]})
    assert problems == []
    return request.param, family_of(request.param), config


def split(family, model, num_stages: int) -> list[torch.nn.Module]:
    ranges = partition_layers(model.config.num_hidden_layers, num_stages)
    return [
        family.split(model, r, first=i == 0, last=i == num_stages - 1, sequence_shards=1)
        for i, r in enumerate(ranges)
    ]


@pytest.mark.parametrize("num_stages", [1, 2, 3])
def test_split_stages_equal_the_hugging_face_model(family_and_config, num_stages):
    _, family, config = family_and_config
    torch.manual_seed(0)
    reference = family.spec.model_class(config).eval()
    model = family.build(config)
    assert type(model) is type(reference)
    model.load_state_dict(reference.state_dict())
    stages = split(family, model, num_stages)
    names = [name for stage in stages for name, _ in stage.named_parameters()]
    assert sorted(names) == sorted(name for name, _ in reference.named_parameters())
    ids = torch.randint(0, config.vocab_size, (2, 16))  # (B, T)
    x = ids
    with torch.no_grad():
        for stage in stages:
            x = stage.eval()(x)
        want = reference(ids).logits  # (B, T, V)
    torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-5)


def test_shape_head_dim_is_the_configured_one(family_and_config):
    name, family, config = family_and_config
    shape = family.shape(config)
    assert shape.head_dim == (16 if name == "qwen3" else 32 // 4)
    assert (shape.num_heads, shape.num_kv_heads, shape.num_layers) == (4, 2, 5)
    assert shape.tied_embeddings is False and shape.vocab_size == 97


def test_plan_covers_every_block(family_and_config):
    name, family, config = family_and_config
    with torch.device("meta"):
        model = family.build(config)
    per_block = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    head_norms = ["self_attn.q_norm", "self_attn.k_norm"]
    first, last = split(family, model, 2)  # layers 0-2 + embedding, 3-4 + norm + head
    for stage, layers in ((first, range(0, 3)), (last, range(3, 5))):
        plan = family.plan(stage, sequence_parallel=False)
        blocks = tuple(f"model.layers.{i}" for i in layers)
        assert plan.ac_units == blocks
        # the vocabulary matrices are units of their own, in execution order
        ends = ("model.embed_tokens",) + blocks if stage is first else blocks + ("lm_head",)
        assert plan.fsdp_units == ends
        # kept gathered from forward to backward: the head, a non-last stage's last block
        assert plan.keep_gathered == ((blocks[-1],) if stage is first else ("lm_head",))
        for block in blocks:
            for module in per_block:
                assert f"{block}.{module}" in plan.tp, f"{name}: {block}.{module}"
            for module in head_norms:
                assert (f"{block}.{module}" in plan.tp) == (name == "qwen3"), f"{block}.{module}"
        for key in plan.tp:  # every style names a module of this stage
            stage.get_submodule(key)
        assert ("model.embed_tokens" in plan.tp) == stage.first
        assert ("lm_head" in plan.tp) == stage.last


@pytest.mark.parametrize("name", FAMILIES)
def test_unknown_and_mistyped_keys_name_the_key(name):
    _, problems = parse(
        name, {"hidden_sise": 64, "num_hidden_layers": 2.5, "tie_word_embeddings": 1}
    )
    assert problems == [
        "t.toml: model.hidden_sise: unknown key (did you mean model.hidden_size?)",
        "t.toml: model.num_hidden_layers: expected an integer, got 2.5",
        "t.toml: model.tie_word_embeddings: expected a boolean, got 1",
    ]


@pytest.mark.parametrize("name", FAMILIES)
def test_offline_hub_name_fails_fast_naming_the_key(name):
    _, problems = parse(name, {}, model_name="HuggingFaceTB/SmolLM-1.7B")
    (line,) = problems
    assert line.startswith("t.toml: model.name: 'HuggingFaceTB/SmolLM-1.7B' is not a local path")
    assert "inline" in line


@pytest.mark.parametrize(("family", "other"), [("llama", "qwen3"), ("qwen3", "llama")])
def test_folder_of_another_model_type_is_one_problem_naming_model_name(tmp_path, family, other):
    """A config.json folder of the other family is refused; of its own, it is read (head_dim
    included)."""
    for kind in FAMILIES:
        config, _ = parse(kind, {**TINY, **EXTRA[kind]})
        config.save_pretrained(tmp_path / kind)
    _, problems = parse(family, {}, model_name=str(tmp_path / other))
    (line,) = problems
    assert line.startswith(f"t.toml: model.name: {tmp_path / other} ")
    assert f"{other!r} model" in line and family in line.rsplit(";", 1)[1]
    config, problems = parse(family, {}, model_name=str(tmp_path / family))
    assert problems == []
    assert family_of(family).shape(config).head_dim == (16 if family == "qwen3" else 8)


def test_tied_single_stage_keeps_nothing_gathered(family_and_config):
    """One stage whose embedding and head share a weight: both stay in the root unit, and its
    last unit, a block, is followed by the head and the loss."""
    name, family, _ = family_and_config
    config, problems = parse(name, {**TINY, **EXTRA[name], "tie_word_embeddings": True})
    assert problems == []
    with torch.device("meta"):
        (stage,) = split(family, family.build(config), 1)
    plan = family.plan(stage, sequence_parallel=False)
    assert plan.fsdp_units == tuple(f"model.layers.{i}" for i in range(5))
    assert plan.keep_gathered == ()


@pytest.mark.parametrize("reshard", ["undeclared", "all"])
def test_fsdp_frees_all_but_the_kept_units_after_forward(family_and_config, reshard):
    """meshtrain.parallelize.apply_fsdp (a world of one, in this process) reshards after
    forward every unit but the plan's keep_gathered ones under "undeclared" (auto), all of them
    under "all"."""
    from pathlib import Path

    from meshtrain.config import load_config
    from meshtrain.mesh import close_mesh, init_mesh
    from meshtrain.parallelize import apply_fsdp

    _, family, config = family_and_config
    stages = split(family, family.build(config), 2)
    mesh = init_mesh(load_config(Path(__file__).parents[1] / "configs" / "tiny_cpu.toml"), "cpu")
    try:
        for stage in stages:
            plan = family.plan(stage, sequence_parallel=False)
            apply_fsdp(stage, plan, mesh, "fp32", reshard)
            for path in plan.fsdp_units:
                group = stage.get_submodule(path)._get_fsdp_state()._fsdp_param_group
                kept = reshard == "undeclared" and path in plan.keep_gathered
                assert group._reshard_after_forward is not kept, path
    finally:
        close_mesh()


def test_a_kept_unit_must_be_an_fsdp_unit():
    from meshtrain.contracts import StagePlan

    with pytest.raises(ValueError, match=r"keep_gathered names modules not in fsdp_units: \['x'\]"):
        StagePlan(fsdp_units=("model.layers.0",), keep_gathered=("x",))
