"""The llama family: stages cover every parameter once, and the split model computes exactly what
Hugging Face's LlamaForCausalLM computes (no process group needed)."""

from __future__ import annotations

import pytest
import torch
from meshtrain_llama import LlamaFamily
from transformers import LlamaForCausalLM

from meshtrain.pipeline import partition_layers


@pytest.fixture
def family_and_config():
    family = LlamaFamily()
    config, problems = family.parse_config(
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 5,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 97,
            "max_position_embeddings": 64,
            "tie_word_embeddings": False,
        },
        name=None,
        trust_remote_code=False,
        where="t.toml: model",
    )
    assert problems == []
    return family, config


@pytest.mark.parametrize("num_stages", [1, 2, 3])
def test_split_stages_equal_the_hugging_face_model(family_and_config, num_stages):
    family, config = family_and_config
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config).eval()
    model = family.build(config)
    model.load_state_dict(reference.state_dict())
    ranges = partition_layers(config.num_hidden_layers, num_stages)
    stages = [
        family.split(model, r, first=i == 0, last=i == num_stages - 1) for i, r in enumerate(ranges)
    ]
    names = [name for stage in stages for name, _ in stage.named_parameters()]
    assert sorted(names) == sorted(name for name, _ in reference.named_parameters())
    ids = torch.randint(0, config.vocab_size, (2, 16))  # (B, T)
    x = ids
    with torch.no_grad():
        for stage in stages:
            x = stage.eval()(x)
        want = reference(ids).logits  # (B, T, V)
    torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-5)


def test_unknown_and_mistyped_keys_name_the_key():
    _, problems = LlamaFamily().parse_config(
        {"hidden_sise": 64, "num_hidden_layers": 2.5, "tie_word_embeddings": 1},
        name=None,
        trust_remote_code=False,
        where="t.toml: model",
    )
    assert problems == [
        "t.toml: model.hidden_sise: unknown key (did you mean model.hidden_size?)",
        "t.toml: model.num_hidden_layers: expected an integer, got 2.5",
        "t.toml: model.tie_word_embeddings: expected a boolean, got 1",
    ]


def test_offline_hub_name_fails_fast_naming_the_key():
    _, problems = LlamaFamily().parse_config(
        {}, name="HuggingFaceTB/SmolLM-1.7B", trust_remote_code=False, where="t.toml: model"
    )
    (line,) = problems
    assert line.startswith("t.toml: model.name: 'HuggingFaceTB/SmolLM-1.7B' is not a local path")
    assert "inline" in line
