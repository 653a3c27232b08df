"""What a family's config says about its model, without torch: the ModelShape of each layout
and the checks of a mixture-of-experts config.

`meshtrain check` reads them from the family's declared config (declared.py), the workers from
transformers' config: both have the same attributes.
"""

from __future__ import annotations

from typing import Any

from meshtrain.api import ModelShape


def decoder_shape(c: Any, qk_norms: str = "") -> ModelShape:
    """A LLaMA-layout decoder (family.py); `qk_norms` as Spec.qk_norms."""
    head_dim = head_dim_of(c)
    kv_heads = {"model.num_key_value_heads": c.num_key_value_heads}
    projection_norms = qk_norms == "projection"
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    block = c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    # Kept for backward per token: the residual around both norms (4 x hidden); q, k, v,
    # the attention output, gate, up, silu(gate), silu(gate) * up (+ normed q, k).
    split = 2 * q + 2 * kv + 4 * c.intermediate_size + (q + kv) * bool(qk_norms)
    return ModelShape(
        num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads,
        head_dim=head_dim,
        vocab_size=c.vocab_size,
        max_positions=c.max_position_embeddings,
        tied_embeddings=bool(c.tie_word_embeddings),
        tp_divisible={
            "model.num_attention_heads": c.num_attention_heads,
            "model.vocab_size": c.vocab_size,
            "model.intermediate_size": c.intermediate_size,
            **(kv_heads if projection_norms else {}),
        },
        # Fewer key/value heads than tp ranks are replicated (KeyValueParallel), except
        # under a norm over the whole k projection, which needs every rank's share.
        tp_divisible_or_multiple={} if projection_norms else kv_heads,
        activations_replicated=4 * c.hidden_size,
        activations_split=split,
        matmul_params=c.num_hidden_layers * block + c.hidden_size * c.vocab_size,
    )


def moe_shape(c: Any, qk_norms: str = "") -> ModelShape:
    """A decoder whose layers may be mixtures of experts (moe.py)."""
    dense = decoder_shape(c, qk_norms)
    moe = moe_layers(c)
    experts, top_k, width = c.num_local_experts, c.num_experts_per_tok, c.hidden_size
    expert_size = getattr(c, "moe_intermediate_size", c.intermediate_size)
    dense_layers = c.num_hidden_layers - len(moe)
    head_dim = head_dim_of(c)
    attention = width * 2 * (c.num_attention_heads + c.num_key_value_heads) * head_dim
    mlp = 3 * width * c.intermediate_size
    active = 3 * width * expert_size * top_k + width * experts
    # Kept for backward per token and layer: as a LLaMA block, with the MLP's share of
    # the dense layers and top_k experts' (gate, up, silu(gate), product) in MoE ones.
    per_layer_mlp = 4 * (c.intermediate_size * dense_layers + expert_size * top_k * len(moe))
    split = dense.activations_split - 4 * c.intermediate_size
    split += per_layer_mlp / c.num_hidden_layers + experts
    divisible = dict(dense.tp_divisible)
    if not dense_layers:
        divisible.pop("model.intermediate_size", None)
    return ModelShape(
        **{
            **dense.__dict__,
            "tp_divisible": divisible,
            "activations_split": split,
            "matmul_params": c.num_hidden_layers * attention
            + dense_layers * mlp
            + len(moe) * active
            + width * c.vocab_size,
            "num_experts": experts,
            "moe_layers": len(moe),
            "ep_divisible": {"model.num_experts": experts},
        }
    )


def neox_shape(c: Any, qk_norms: str = "") -> ModelShape:
    """GPT-NeoX (neox.py); it has no q/k norms."""
    h, i = c.hidden_size, c.intermediate_size
    return ModelShape(
        num_layers=c.num_hidden_layers,
        hidden_size=h,
        num_heads=c.num_attention_heads,
        num_kv_heads=c.num_attention_heads,
        head_dim=h // c.num_attention_heads,
        vocab_size=c.vocab_size,
        max_positions=c.max_position_embeddings,
        tied_embeddings=bool(c.tie_word_embeddings),
        tp_divisible={
            "model.num_attention_heads": c.num_attention_heads,
            "model.vocab_size": c.vocab_size,
            "model.intermediate_size": i,
        },
        # Kept for backward per token: the block input and both norm outputs, the residual
        # sum (4 x hidden); q, k, v (after rotary), the attention output, the MLP's two.
        activations_replicated=4 * h,
        activations_split=3 * h + h + 2 * i,
        matmul_params=c.num_hidden_layers * (4 * h * h + 2 * h * i) + h * c.vocab_size,
    )


def moe_problems(config: Any, where: str) -> list[str]:
    """What meshtrain refuses in a mixture-of-experts config that transformers accepts."""
    if getattr(config, "router_jitter_noise", 0.0):
        return [
            f"{where}.router_jitter_noise: {config.router_jitter_noise} is not supported: "
            "random noise on the router inputs would route tokens differently per layout; "
            "set it to 0"
        ]
    if config.num_experts_per_tok > config.num_local_experts:
        return [
            f"{where}.num_experts_per_tok: {config.num_experts_per_tok} exceeds "
            f"the {config.num_local_experts} experts (model.num_experts)"
        ]
    return []


def moe_layers(c: Any) -> list[int]:
    """Indices of the MoE layers: every layer (Mixtral), or as Qwen3-MoE's decoder picks them."""
    if not hasattr(c, "decoder_sparse_step"):
        return list(range(c.num_hidden_layers))
    return [
        i
        for i in range(c.num_hidden_layers)
        if i not in c.mlp_only_layers
        and c.num_local_experts > 0
        and (i + 1) % c.decoder_sparse_step == 0
    ]


def head_dim_of(c: Any) -> int:
    """Width of one attention head: the config's head_dim, else hidden_size / heads."""
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
