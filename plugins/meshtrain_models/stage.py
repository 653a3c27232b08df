"""One pipeline stage of a Hugging Face decoder (LLaMA layout), keeping Hugging Face names.

A stage holds a slice of decoder layers (`model.layers.<i>`), the embedding if it is first and the
final norm + head if it is last. Every stage computes the rotary embeddings itself, so only hidden
states (B, T, C) travel between stages.

Attention is sdpa, causal by itself without a mask. A layer with a sliding window (Mistral's
`sliding_window`, Qwen2's sliding layers) shorter than the sequence gets the boolean mask
transformers builds for it: query i sees keys i - window < j <= i.
"""

from __future__ import annotations

import torch
from torch import nn


class DecoderStage(nn.Module):
    def __init__(
        self, model: nn.Module, layers: range, *, first: bool, last: bool, sequence_shards: int
    ):
        super().__init__()
        self.config = model.config
        self.model = nn.Module()  # named "model" so parameter names match Hugging Face's
        if first:
            self.model.embed_tokens = model.model.embed_tokens
        # ModuleDict keyed by the global index keeps names like model.layers.3.mlp.up_proj.weight
        self.model.layers = nn.ModuleDict({str(i): model.model.layers[i] for i in layers})
        if last:
            self.model.norm = model.model.norm
            self.lm_head = model.lm_head
        self.model.rotary_emb = model.model.rotary_emb
        self.first, self.last = first, last
        self.sequence_shards = sequence_shards

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Token ids (B, T) are whole; hidden states (B, T / shards, C) are sequence shards.
        seq_len = x.shape[1] if self.first else x.shape[1] * self.sequence_shards
        h = self.model.embed_tokens(x) if self.first else x  # (B, T, C)
        positions = torch.arange(seq_len, device=h.device).unsqueeze(0)  # (1, T)
        rotary = self.model.rotary_emb(h, positions)  # cos, sin: (1, T, head_dim)
        masks: dict[int | None, torch.Tensor | None] = {}
        for layer in self.model.layers.values():
            window = sliding_window(layer.self_attn)
            if window not in masks:
                masks[window] = causal_mask(seq_len, window, h.device)
            h = layer(
                h, attention_mask=masks[window], position_embeddings=rotary, position_ids=positions
            )
        if self.last:
            h = self.lm_head(self.model.norm(h))  # (B, T, V), vocab-sharded under tp
        return h


def sliding_window(attention: nn.Module) -> int | None:
    """The attention's window: Qwen2/Qwen3 set it per layer, Mistral reads its config."""
    if hasattr(attention, "sliding_window"):
        return attention.sliding_window
    return getattr(attention.config, "sliding_window", None)


def causal_mask(seq_len: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """None (sdpa's own causal mask) unless `window` is shorter than the sequence; then the
    (T, T) boolean sliding-window mask, True where a query may attend."""
    if window is None or seq_len <= window:
        return None
    query = torch.arange(seq_len, device=device).unsqueeze(1)  # (T, 1)
    key = torch.arange(seq_len, device=device).unsqueeze(0)  # (1, T)
    return (key <= query) & (key > query - window)  # (T, T)
