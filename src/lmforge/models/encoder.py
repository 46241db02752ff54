"""A3: the encoder family, BERT exactly as transformers' BertForPreTraining computes it.

Learned absolute positions and token-type embeddings summed with the word embeddings, then a
LayerNorm; post-LN blocks (x = norm(x + sublayer(x))) with biases and the exact (erf) GELU; a [CLS]
pooler (dense + tanh) feeding the next-sentence head; an MLM head (dense + GELU + LayerNorm) whose
decoder is the word embedding matrix plus a bias of its own. Without `nsp_head` the pooler is absent
too, as in BertForMaskedLM. No dropout: lmforge pretrains without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig, check
from lmforge.models import init
from lmforge.models.layers import Attention, vocab_logits
from lmforge.models.masks import AttnMask, lower, self_allowed
from lmforge.models.positions import default_positions
from lmforge.models.registry import ARCHITECTURES
from lmforge.objectives.base import AttentionLayout


@dataclass
class EncoderConfig(ModelConfig):
    family: ClassVar[str] = "encoder"

    arch: str = "encoder"
    max_seq_len: int = 512  # learned positions: the longest input the model can read
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 0  # 0 -> 4 * d_model (BERT's intermediate size)
    type_vocab_size: int = 2  # token types (segments A and B)
    norm_eps: float = 1e-12
    init_std: float = 0.02
    nsp_head: bool = True  # pooler + next-sentence classifier (BertForPreTraining); off: BertForMaskedLM

    def validate(self, where: str) -> None:
        super().validate(where)
        check(where, "d_model", self.d_model > 0, "must be > 0", self.d_model)
        check(where, "n_layers", self.n_layers > 0, "must be > 0", self.n_layers)
        check(where, "n_heads", self.n_heads > 0 and self.d_model % self.n_heads == 0,
              f"must divide {where}.d_model ({self.d_model})", self.n_heads)
        check(where, "d_ff", self.d_ff >= 0, "must be >= 0 (0 = 4 d_model)", self.d_ff)
        # Sentence pairs put segment B on token type 1, so an NSP model needs two types.
        check(where, "type_vocab_size", self.type_vocab_size >= (2 if self.nsp_head else 1),
              "must be >= 2 with nsp_head (sentence B has token type 1), else >= 1", self.type_vocab_size)
        check(where, "norm_eps", self.norm_eps > 0, "must be > 0", self.norm_eps)
        check(where, "init_std", self.init_std > 0, "must be > 0", self.init_std)

    def resolved_d_ff(self) -> int:
        return self.d_ff or 4 * self.d_model


class EncoderBlock(nn.Module):
    """Post-norm residual block: x = norm(x + attn(x)), then x = norm(x + mlp(x))."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.attention = Attention(cfg.d_model, cfg.n_heads, bias=True)
        self.attention_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.intermediate = nn.Linear(cfg.d_model, cfg.resolved_d_ff())
        self.output = nn.Linear(cfg.resolved_d_ff(), cfg.d_model)
        self.output_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor, mask: AttnMask) -> torch.Tensor:
        x = self.attention_norm(x + self.attention(x, mask))
        return self.output_norm(x + self.output(F.gelu(self.intermediate(x))))


@ARCHITECTURES.register("encoder", config=EncoderConfig)
class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.word_embeddings = nn.Embedding(cfg.vocab_size, d)
        self.position_embeddings = nn.Embedding(cfg.max_seq_len, d)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, d)
        self.embedding_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.layers = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layers))
        self.mlm_transform = nn.Linear(d, d)
        self.mlm_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.mlm_bias = nn.Parameter(torch.empty(cfg.vocab_size))  # the decoder weight is word_embeddings
        self.pooler = nn.Linear(d, d) if cfg.nsp_head else None
        self.nsp = nn.Linear(d, 2) if cfg.nsp_head else None

    @torch.no_grad()
    def init_weights(self) -> None:
        """As BertPreTrainedModel._init_weights: N(0, init_std) for every Linear and Embedding, zero
        biases (the MLM output bias included), LayerNorm weight 1 and bias 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                init.normal_(module.weight, 0.0, self.cfg.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.zeros_(self.mlm_bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        layout: AttentionLayout | None = None,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        predict_positions: torch.Tensor | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """input_ids [B, T] -> MLM logits [B, T, vocab_size], or with the NSP head
        {"logits": ..., "nsp_logits": [B, 2]}. Padding is segment 0 of the layout. With
        `predict_positions` [B, T] bool the logits are [N, vocab_size] for those N positions only:
        the MLM head (about 40% of a small BERT's compute) runs where the loss is (sparse prediction,
        as MosaicBERT does)."""
        T = input_ids.shape[1]
        if position_ids is None:
            position_ids = default_positions(T, input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        # Summed in transformers' order (word + type, then + position) for bit-level parity.
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = self.embedding_norm(x + self.position_embeddings(position_ids))
        mask = self._mask(layout or AttentionLayout(causal=False), T, input_ids.device)
        for layer in self.layers:
            x = layer(x, mask)
        h = x if predict_positions is None else x[predict_positions]
        h = self.mlm_norm(F.gelu(self.mlm_transform(h)))
        logits = vocab_logits(h, self.word_embeddings.weight, self.mlm_bias)
        if self.nsp is None:
            return logits
        pooled = torch.tanh(self.pooler(x[:, 0]))
        return {"logits": logits, "nsp_logits": self.nsp(pooled)}

    @staticmethod
    def _mask(layout: AttentionLayout, T: int, device: torch.device) -> AttnMask:
        """Built once per forward. A row without segments or prefix sees everything: no mask tensor,
        so SDPA takes a fused kernel."""
        if layout.causal:
            raise ValueError("the encoder attends both ways; it got a causal attention layout")
        if layout.segment_ids is None and layout.prefix is None:
            return AttnMask()
        return lower(self_allowed(layout, T, device), None, False, T, T, device)
