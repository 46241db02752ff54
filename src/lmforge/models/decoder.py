"""A1/A2: the causal decoder (Llama architecture). A prefix decoder is the same model read with a
prefix attention layout; the objective decides, the model only follows `layout`."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models import ARCHITECTURES, resolve_d_ff
from lmforge.models.init import init_weights
from lmforge.models.layers import Block, RMSNorm
from lmforge.models.positions import RotaryEmbedding
from lmforge.objectives.base import AttentionLayout


@ARCHITECTURES.register("decoder")
class CausalDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d_ff = resolve_d_ff(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, d_ff) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(cfg.d_model // cfg.n_heads, cfg.rope_theta)
        init_weights(self, cfg)

    def forward(self, input_ids: torch.Tensor, layout: AttentionLayout | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab_size]."""
        seq_len = input_ids.shape[1]
        mask = None if layout is None else layout.mask(seq_len, input_ids.device)
        cos, sin = self.rope(seq_len, input_ids.device)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.norm(x))
