"""Each stage's parameters declared from the config (`ModelFamily.stage_parameters`), without
torch: the names `split` gives them, their shapes, and how the plan splits them.

They mirror the transformers modules a stage holds (stage.py, neox.py) and the plans (plan.py,
moe.py); tests/test_declared.py holds them to the meta model's own parameters and StagePlans for
every family, so a change to one side that the other misses fails there. No parameter's split
depends on sequence parallel in these plans (the norms it adds stay whole on each tp rank).
"""

from __future__ import annotations

from typing import Any

from meshtrain.api import ParamSpec
from meshtrain_models.shapes import head_dim_of, moe_layers

EMBEDDINGS = {"llama": "model.embed_tokens.weight", "neox": "gpt_neox.embed_in.weight"}


def tied_parameters(layout: str, c: Any) -> list[tuple[str, str]]:
    """The head shares the embedding's weight when the config ties them."""
    if not c.tie_word_embeddings:
        return []
    return [(EMBEDDINGS.get(layout, EMBEDDINGS["llama"]), "lm_head.weight")]


def decoder_parameters(
    c: Any, layers: range, *, first: bool, last: bool, tp: int, spec: dict[str, Any]
) -> list[ParamSpec]:
    """A LLaMA-layout stage (stage.py; blocks as family.Spec `spec` describes them), or a
    mixture-of-experts one (moe.py) when `spec` says layout "moe"."""
    width = c.hidden_size
    found = []
    if first:  # VocabParallelEmbedding
        found.append(_vocab_matrix("model.embed_tokens", c, first, last))
    moe = set(moe_layers(c)) if spec.get("layout") == "moe" else set()
    for i in layers:
        block = _Block(f"model.layers.{i}")
        _attention(block, c, tp, spec)
        if i in moe:
            _experts(block, c)
        else:
            _mlp(block, c, spec)
        norms = ("post_attention_layernorm", "post_feedforward_layernorm")
        if not spec.get("post_norms"):
            norms = ("input_layernorm", "post_attention_layernorm")
        for norm in norms:
            block.add(f"{norm}.weight", (width,))
        found += block.specs
    if last:  # the head column-parallel, logits vocab-sharded
        found.append(ParamSpec(name="model.norm.weight", shape=(width,)))
        found.append(_vocab_matrix("lm_head", c, first, last))
    return found


def neox_parameters(
    c: Any, layers: range, *, first: bool, last: bool, tp: int, spec: dict[str, Any]
) -> list[ParamSpec]:
    """A GPT-NeoX stage (neox.py): LayerNorms with biases, per-head fused qkv, a biased MLP."""
    width, inner = c.hidden_size, c.intermediate_size
    found = []
    if first:
        found.append(_vocab_matrix("gpt_neox.embed_in", c, first, last))
    for i in layers:
        block = _Block(f"gpt_neox.layers.{i}")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            block.add(f"{norm}.weight", (width,))
            block.add(f"{norm}.bias", (width,))
        block.linear("attention.query_key_value", 3 * width, width, c.attention_bias, "column")
        block.linear("attention.dense", width, width, c.attention_bias, "row")
        block.linear("mlp.dense_h_to_4h", inner, width, True, "column")
        block.linear("mlp.dense_4h_to_h", width, inner, True, "row")
        found += block.specs
    if last:
        for name in ("weight", "bias"):
            found.append(ParamSpec(name=f"gpt_neox.final_layer_norm.{name}", shape=(width,)))
        found.append(_vocab_matrix("lm_head", c, first, last))
    return found


def _vocab_matrix(module: str, c: Any, first: bool, last: bool) -> ParamSpec:
    """The embedding's or head's weight, split over the vocabulary on tp: an FSDP2 unit of its
    own (plan.vocab_units), except when one stage holds both and they share the weight (then
    the stage's root holds them)."""
    shared = first and last and c.tie_word_embeddings
    return ParamSpec(
        name=f"{module}.weight",
        shape=(c.vocab_size, c.hidden_size),
        tp_dim=0,
        fsdp_unit="" if shared else module,
    )


class _Block:
    """The parameters of one decoder block (its own FSDP2 unit), as they are declared."""

    def __init__(self, prefix: str):
        self.prefix, self.specs = prefix, []

    def add(self, name: str, shape: tuple[int, ...], tp_dim: int | None = None, **kw: Any):
        self.specs.append(
            ParamSpec(
                name=f"{self.prefix}.{name}",
                shape=shape,
                tp_dim=tp_dim,
                fsdp_unit=self.prefix,
                **kw,
            )
        )

    def linear(self, name: str, out: int, inp: int, bias: bool, split: str | None) -> None:
        """An nn.Linear: column-parallel splits weight and bias by output features, row-parallel
        the weight by input features and leaves the bias whole."""
        self.add(f"{name}.weight", (out, inp), {"column": 0, "row": 1, None: None}[split])
        if bias:
            self.add(f"{name}.bias", (out,), 0 if split == "column" else None)


def _attention(block: _Block, c: Any, tp: int, spec: dict[str, Any]) -> None:
    width, head = c.hidden_size, head_dim_of(c)
    q, kv = c.num_attention_heads * head, c.num_key_value_heads * head
    # KeyValueParallel: split like q when tp divides the key/value heads, else whole per rank.
    kv_split = "column" if c.num_key_value_heads % tp == 0 else None
    qkv_bias = spec.get("qkv_bias", False) or getattr(c, "attention_bias", False)
    if spec.get("fused"):  # Phi-3's [Q | K | V] (FusedColwiseParallel: weight rows split)
        block.linear("self_attn.qkv_proj", q + 2 * kv, width, False, "column")
    else:
        block.linear("self_attn.q_proj", q, width, qkv_bias, "column")
        block.linear("self_attn.k_proj", kv, width, qkv_bias, kv_split)
        block.linear("self_attn.v_proj", kv, width, qkv_bias, kv_split)
    block.linear("self_attn.o_proj", width, q, getattr(c, "attention_bias", False), "row")
    qk_norms = spec.get("qk_norms", "")
    if qk_norms == "head":  # over each head, whole on each rank
        block.add("self_attn.q_norm.weight", (head,))
        block.add("self_attn.k_norm.weight", (head,))
    elif qk_norms == "projection":  # over the whole projection, split with it
        block.add("self_attn.q_norm.weight", (q,), 0)
        block.add("self_attn.k_norm.weight", (kv,), 0)


def _mlp(block: _Block, c: Any, spec: dict[str, Any]) -> None:
    width, inner, bias = c.hidden_size, c.intermediate_size, getattr(c, "mlp_bias", False)
    if spec.get("fused"):  # Phi-3's [gate | up]
        block.linear("mlp.gate_up_proj", 2 * inner, width, False, "column")
    else:
        block.linear("mlp.gate_proj", inner, width, bias, "column")
        block.linear("mlp.up_proj", inner, width, bias, "column")
    block.linear("mlp.down_proj", width, inner, bias, "row")


def _experts(block: _Block, c: Any) -> None:
    """A mixture of experts: not split over tp; its experts split over ep (meshtrain.experts)."""
    width, experts = c.hidden_size, c.num_local_experts
    inner = getattr(c, "moe_intermediate_size", c.intermediate_size)
    block.add("mlp.gate.weight", (experts, width))
    block.add("mlp.experts.gate_up_proj", (experts, 2 * inner, width), expert=True)
    block.add("mlp.experts.down_proj", (experts, width, inner), expert=True)
