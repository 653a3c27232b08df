"""One pipeline stage of a Hugging Face decoder (LLaMA layout), keeping Hugging Face names.

A stage holds a slice of decoder layers (`model.layers.<i>`), the embedding if it is first and the
final norm + head if it is last. Every stage computes the rotary embeddings itself, so only hidden
states (B, T, C) travel between stages.
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
        for layer in self.model.layers.values():
            # No mask: sdpa attention is causal by itself (eager attention is not).
            h = layer(h, position_embeddings=rotary, position_ids=positions)
        if self.last:
            h = self.lm_head(self.model.norm(h))  # (B, T, V), vocab-sharded under tp
        return h
