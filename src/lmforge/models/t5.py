"""A3: T5 v1.1, the `t5` variant of the encoder-decoder (computes what transformers'
T5ForConditionalGeneration computes with feed_forward_proj="gated-gelu").

Pre-norm blocks with T5's RMS LayerNorm, no biases anywhere, unscaled attention scores (T5 folds
1/sqrt(d) into its init), per-head width `d_kv` independent of d_model, and a bucketed relative
position bias per stack: the encoder's bidirectional, the decoder's causal. transformers keeps that
bias in each stack's first layer and hands it to the others; here it is the stack's own module, folded
with the stack's mask once per forward. Cross-attention has no position bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models import init
from lmforge.models.encoder_decoder import EncoderDecoderConfig, Seq2SeqModel, check_cacheable
from lmforge.models.layers import Attention, KVCache, RMSNorm, vocab_logits
from lmforge.models.masks import AttnMask, cross_allowed, lower, self_allowed
from lmforge.models.positions import T5RelativeBias, default_positions
from lmforge.objectives.base import AttentionLayout


class GatedGelu(nn.Module):
    """T5 v1.1's MLP: wo(gelu_tanh(wi_0 x) * wi_1 x), no biases (transformers' T5DenseGatedActDense)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.wi_0 = nn.Linear(d_model, d_ff, bias=False)
        self.wi_1 = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class T5Block(nn.Module):
    """x + attn(norm(x)); in the decoder also x + cross_attn(norm(x), encoder); then x + mlp(norm(x))."""

    def __init__(self, cfg: EncoderDecoderConfig, cross: bool):
        super().__init__()
        self.self_attn_norm = RMSNorm(cfg.d_model, cfg.eps)
        self.self_attn = Attention(cfg.d_model, cfg.n_heads, head_dim=cfg.head_dim, scale=1.0)
        if cross:
            self.cross_attn_norm = RMSNorm(cfg.d_model, cfg.eps)
            self.cross_attn = Attention(cfg.d_model, cfg.n_heads, head_dim=cfg.head_dim, scale=1.0)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.eps)
        self.mlp = GatedGelu(cfg.d_model, cfg.ff_dim)

    def forward(self, x: torch.Tensor, mask: AttnMask, memory: torch.Tensor | None = None,
                cross_mask: AttnMask | None = None, cache: KVCache | None = None, layer_idx: int = 0
                ) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_norm(x), mask, cache=cache, layer_idx=layer_idx)
        if memory is not None:
            assert cross_mask is not None
            x = x + self.cross_attn(self.cross_attn_norm(x), cross_mask, kv_input=memory, cache=cache,
                                    layer_idx=layer_idx)
        return x + self.mlp(self.mlp_norm(x))


class T5Stack(nn.Module):
    """The encoder (cross=False) or the decoder (cross=True): layers sharing one relative bias, then a
    final norm. Token embeddings are the model's (shared by both stacks)."""

    def __init__(self, cfg: EncoderDecoderConfig, n_layers: int, cross: bool):
        super().__init__()
        self.relative_bias = T5RelativeBias(cfg.n_heads, cfg.relative_buckets, cfg.relative_max_distance,
                                            bidirectional=not cross)
        self.layers = nn.ModuleList(T5Block(cfg, cross) for _ in range(n_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.eps)

    def self_mask(self, layout: AttentionLayout, positions: torch.Tensor | None, seq_len: int,
                  device: torch.device) -> AttnMask:
        """The layout's mask with this stack's position bias folded in (positions restart per packed
        segment, so the bias measures distances inside a document)."""
        if positions is None:
            positions = default_positions(seq_len, device)
        bias = self.relative_bias(positions, positions)
        return lower(self_allowed(layout, seq_len, device), bias, layout.causal, seq_len, seq_len, device)

    def cached_mask(self, cache: KVCache, n_new: int, device: torch.device) -> AttnMask:
        """Causal mask with this stack's bias for `n_new` decoder tokens following the cached ones."""
        positions = cache.next_positions(n_new, device)
        cache.append(positions)
        bias = self.relative_bias(positions, cache.positions)
        return lower(cache.allowed(n_new), bias, n_new > 1, n_new, cache.length, device)

    def forward(self, x: torch.Tensor, mask: AttnMask, memory: torch.Tensor | None = None,
                cross_mask: AttnMask | None = None, cache: KVCache | None = None) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, memory, cross_mask, cache, i)
        return self.final_norm(x)


class T5Model(Seq2SeqModel):
    def __init__(self, cfg: EncoderDecoderConfig):
        super().__init__()
        if cfg.variant != "t5":
            raise ValueError(f"T5Model builds model.variant 't5', got {cfg.variant!r}")
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg, cfg.n_layers, cross=False)
        self.decoder = T5Stack(cfg, cfg.decoder_layers, cross=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tied:
            self.lm_head.weight = self.shared.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """T5PreTrainedModel._init_weights with initializer_factor 1: unit-variance embeddings, each
        projection N(0, fan_in^-0.5), except q, whose extra (d_kv)^-0.5 stands in for the score scaling
        T5 leaves out."""
        cfg = self.cfg
        d_model, d_kv, inner = cfg.d_model, cfg.head_dim, cfg.n_heads * cfg.head_dim
        init.normal_(self.shared.weight, 0.0, 1.0)
        if not cfg.tied:
            init.normal_(self.lm_head.weight, 0.0, 1.0)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, T5RelativeBias):
                init.normal_(module.relative_attention_bias.weight, 0.0, d_model**-0.5)
            elif isinstance(module, Attention):
                init.normal_(module.q_proj.weight, 0.0, (d_model * d_kv) ** -0.5)
                init.normal_(module.k_proj.weight, 0.0, d_model**-0.5)
                init.normal_(module.v_proj.weight, 0.0, d_model**-0.5)
                init.normal_(module.o_proj.weight, 0.0, inner**-0.5)
            elif isinstance(module, GatedGelu):
                init.normal_(module.wi_0.weight, 0.0, d_model**-0.5)
                init.normal_(module.wi_1.weight, 0.0, d_model**-0.5)
                init.normal_(module.wo.weight, 0.0, cfg.ff_dim**-0.5)

    def encode(
        self,
        input_ids: torch.Tensor,
        layout: AttentionLayout | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, S] -> encoder output [B, S, d_model] (after the final norm)."""
        layout = layout or AttentionLayout(causal=False)
        mask = self.encoder.self_mask(layout, position_ids, input_ids.shape[1], input_ids.device)
        return self.encoder(self.shared(input_ids), mask)

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        encoder_out: torch.Tensor,
        layout: AttentionLayout | None = None,
        decoder_layout: AttentionLayout | None = None,
        decoder_position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """decoder_input_ids [B, T] attending to encoder_out [B, S, d] -> logits [B, T, V]. `layout`
        is the encoder's: cross-attention keeps a decoder token on its own segment's encoder tokens.
        With a cache (one plain decoder row per example), the tokens follow the cached ones."""
        T, S, device = decoder_input_ids.shape[1], encoder_out.shape[1], decoder_input_ids.device
        layout = layout or AttentionLayout(causal=False)
        decoder_layout = decoder_layout or AttentionLayout(causal=True)
        if cache is not None:
            check_cacheable(decoder_layout, decoder_position_ids)
            mask = self.decoder.cached_mask(cache, T, device)
        else:
            mask = self.decoder.self_mask(decoder_layout, decoder_position_ids, T, device)
        cross_mask = lower(cross_allowed(decoder_layout, layout, T, S, device), None, False, T, S, device)
        x = self.decoder(self.shared(decoder_input_ids), mask, encoder_out, cross_mask, cache)
        if self.cfg.tied:  # T5 rescales before the shared embedding matrix doubles as the output layer
            x = x * self.cfg.d_model**-0.5
        return vocab_logits(x, self.lm_head.weight)
