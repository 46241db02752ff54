"""A3: encoder-decoder models, one config with two variants of transformers' layouts:

- `t5`: T5 v1.1 (models/t5.py): pre-norm RMSNorm without bias, no 1/sqrt(d) score scaling, bucketed
  relative position bias per stack (computed once, shared by the stack's layers), gated-GELU (tanh)
  MLP, `d_kv` per head independent of d_model, untied embeddings by default.
- `bart`: BART (models/bart.py): learned positions with BART's offset of 2, LayerNorm with bias,
  post-LN, embedding LayerNorm, GELU, tied embeddings.

Both read an Example's encoder layout/ids and decoder layout/ids; cross-attention follows segment ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from lmforge.config import ModelConfig, check
from lmforge.models.registry import ARCHITECTURES
from lmforge.objectives.base import AttentionLayout


@dataclass
class EncoderDecoderConfig(ModelConfig):
    family: ClassVar[str] = "encoder_decoder"

    arch: str = "encoder_decoder"
    variant: Literal["t5", "bart"] = "t5"
    d_model: int = 128
    n_layers: int = 2  # encoder layers
    n_decoder_layers: int = 0  # 0 -> n_layers
    n_heads: int = 4
    d_kv: int = 0  # T5's per-head width; 0 -> d_model // n_heads (BART always uses that)
    d_ff: int = 0  # 0 -> t5: 2 * d_model (gated), bart: 4 * d_model
    relative_buckets: int = 32  # t5
    relative_max_distance: int = 128  # t5
    norm_eps: float = 0.0  # 0 -> t5: 1e-6, bart: 1e-5
    tie_embeddings: bool | None = None  # None -> t5: False (v1.1), bart: True
    init_std: float = 0.02  # bart's N(0, std); t5 scales its own per matrix (initializer_factor 1)

    def validate(self, where: str) -> None:
        super().validate(where)
        for key in ("d_model", "n_layers", "n_heads"):
            check(where, key, getattr(self, key) > 0, "must be > 0", getattr(self, key))
        for key in ("n_decoder_layers", "d_kv", "d_ff"):
            check(where, key, getattr(self, key) >= 0, "must be >= 0 (0 = the variant's default)", getattr(self, key))
        if self.variant == "bart" or self.d_kv == 0:
            check(where, "n_heads", self.d_model % self.n_heads == 0, f"must divide {where}.d_model", self.n_heads)
        if self.variant == "bart":
            check(where, "d_kv", self.d_kv in (0, self.d_model // self.n_heads), "is T5-only (BART: d_model/n_heads)",
                  self.d_kv)
        check(where, "relative_buckets", self.relative_buckets >= 2, "must be >= 2", self.relative_buckets)

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layers or self.n_layers

    @property
    def head_dim(self) -> int:
        return self.d_kv or self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        return self.d_ff or (2 if self.variant == "t5" else 4) * self.d_model

    @property
    def eps(self) -> float:
        return self.norm_eps or (1e-6 if self.variant == "t5" else 1e-5)

    @property
    def tied(self) -> bool:
        return self.tie_embeddings if self.tie_embeddings is not None else self.variant == "bart"


class Seq2SeqModel(nn.Module):
    """The forward both variants share; each defines `encode(input_ids, layout, position_ids)` and
    `decode(decoder_input_ids, encoder_out, layout, decoder_layout, decoder_position_ids)`, which
    generation calls separately to reuse the encoder output."""

    def forward(
        self,
        input_ids: torch.Tensor,
        layout: AttentionLayout | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        decoder_input_ids: torch.Tensor,
        decoder_layout: AttentionLayout | None = None,
        decoder_position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encoder ids [B, S] and decoder ids [B, T] -> logits [B, T, vocab_size]."""
        encoder_out = self.encode(input_ids, layout, position_ids)
        return self.decode(decoder_input_ids, encoder_out, layout, decoder_layout, decoder_position_ids)


def check_cacheable(decoder_layout: AttentionLayout, decoder_position_ids: torch.Tensor | None) -> None:
    """Cached decoding continues one causal decoder row per example: no packed segments, no prefix, and
    positions that follow the cache (so none are given)."""
    plain = decoder_layout.is_plain_causal and decoder_position_ids is None
    if not plain:
        raise ValueError("KV-cached decoding takes a plain causal decoder layout and no decoder_position_ids")


@ARCHITECTURES.register("encoder_decoder", config=EncoderDecoderConfig)
def build_encoder_decoder(cfg: EncoderDecoderConfig) -> nn.Module:
    if cfg.variant == "t5":
        from lmforge.models.t5 import T5Model

        return T5Model(cfg)
    from lmforge.models.bart import BartModel

    return BartModel(cfg)
