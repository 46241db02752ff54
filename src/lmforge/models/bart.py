"""A3: BART, the maths of transformers' BartForConditionalGeneration (bart-base/large, not mBART).

Post-LN blocks with biased LayerNorm and exact GELU, a LayerNorm over the embeddings of each stack,
learned positions read at row position + 2 (fairseq reserved the first two rows), 1/sqrt(head_dim)
score scaling, biases everywhere, token embeddings shared by both stacks and (by default) the output
projection, and transformers' `final_logits_bias` buffer (zero unless an imported checkpoint sets it).
Module names follow transformers' except attention's `o_proj` (its `out_proj`), so an export maps names
one to one.

Attention follows the layouts: the encoder's `layout` (bidirectional inside segment ids), the decoder's
`decoder_layout` (causal inside segment ids) and cross-attention between equal segment ids; positions
restart per packed segment through `position_ids` / `decoder_position_ids`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models import init
from lmforge.models.encoder_decoder import EncoderDecoderConfig, Seq2SeqModel, check_cacheable
from lmforge.models.layers import Attention, KVCache, vocab_logits
from lmforge.models.masks import AttnMask, cross_allowed, lower, self_allowed
from lmforge.models.positions import default_positions
from lmforge.objectives.base import AttentionLayout

POSITION_OFFSET = 2  # BartLearnedPositionalEmbedding: position p reads row p + 2


class Layer(nn.Module):
    """What both stacks' post-LN layers have: self-attention and the MLP, each followed by its norm."""

    def __init__(self, cfg: EncoderDecoderConfig):
        super().__init__()
        self.self_attn = Attention(cfg.d_model, cfg.n_heads, bias=True)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model, eps=cfg.eps)
        self.fc1 = nn.Linear(cfg.d_model, cfg.ff_dim)
        self.fc2 = nn.Linear(cfg.ff_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model, eps=cfg.eps)

    def attend(self, x: torch.Tensor, mask: AttnMask, cache: KVCache | None = None, layer_idx: int = 0
               ) -> torch.Tensor:
        return self.self_attn_layer_norm(x + self.self_attn(x, mask, cache=cache, layer_idx=layer_idx))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Exact (erf) GELU: BART's activation_function "gelu"."""
        return self.final_layer_norm(x + self.fc2(F.gelu(self.fc1(x))))


class EncoderLayer(Layer):
    def forward(self, x: torch.Tensor, mask: AttnMask) -> torch.Tensor:
        return self.feed_forward(self.attend(x, mask))


class DecoderLayer(Layer):
    """Self-attention, then cross-attention to the encoder output, then the MLP; each post-LN."""

    def __init__(self, cfg: EncoderDecoderConfig):
        super().__init__(cfg)
        self.encoder_attn = Attention(cfg.d_model, cfg.n_heads, bias=True)
        self.encoder_attn_layer_norm = nn.LayerNorm(cfg.d_model, eps=cfg.eps)

    def forward(self, x: torch.Tensor, encoder_out: torch.Tensor, self_mask: AttnMask, cross_mask: AttnMask,
                cache: KVCache | None = None, layer_idx: int = 0) -> torch.Tensor:
        x = self.attend(x, self_mask, cache, layer_idx)
        cross = self.encoder_attn(x, cross_mask, kv_input=encoder_out, cache=cache, layer_idx=layer_idx)
        x = self.encoder_attn_layer_norm(x + cross)
        return self.feed_forward(x)


class Stack(nn.Module):
    """What both stacks have before their layers: learned positions and the embedding LayerNorm."""

    def __init__(self, cfg: EncoderDecoderConfig, layers: nn.ModuleList):
        super().__init__()
        self.embed_positions = nn.Embedding(cfg.max_seq_len + POSITION_OFFSET, cfg.d_model)
        self.layernorm_embedding = nn.LayerNorm(cfg.d_model, eps=cfg.eps)
        self.layers = layers

    def embed(self, tokens: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        """tokens [B, T, d] (token embeddings) plus positions, normalised."""
        if position_ids is None:
            position_ids = default_positions(tokens.shape[1], tokens.device)
        return self.layernorm_embedding(tokens + self.embed_positions(position_ids + POSITION_OFFSET))


class BartModel(Seq2SeqModel):
    def __init__(self, cfg: EncoderDecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg, nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers)))
        self.decoder = Stack(cfg, nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers)))
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tied:
            self.lm_head.weight = self.shared.weight
        # A persistent buffer as in transformers, so checkpoints and exports carry it; never trained.
        self.register_buffer("final_logits_bias", torch.empty(1, cfg.vocab_size))

    @torch.no_grad()
    def init_weights(self) -> None:
        """transformers' BART init: N(0, init_std) for every linear and embedding (positions included),
        zero biases, LayerNorm 1/0, zero final_logits_bias. transformers also zeroes the pad token's row;
        here pad is the decoder start token (a live input) and the config knows no pad id, so that row is
        drawn like the others. Forward parity does not depend on it."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                init.normal_(module.weight, 0.0, self.cfg.init_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        self.final_logits_bias.zero_()

    def encode(
        self, input_ids: torch.Tensor, layout: AttentionLayout | None = None, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The encoder's output [B, S, d_model]; `layout` defaults to one bidirectional segment."""
        layout = layout or AttentionLayout(causal=False)
        S = input_ids.shape[1]
        mask = lower(self_allowed(layout, S, input_ids.device), None, layout.causal, S, S, input_ids.device)
        x = self.encoder.embed(self.shared(input_ids), position_ids)
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return x

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        encoder_out: torch.Tensor,
        layout: AttentionLayout | None = None,
        decoder_layout: AttentionLayout | None = None,
        decoder_position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """decoder_input_ids [B, T] attending to encoder_out [B, S, d] -> logits [B, T, vocab_size]. `layout`
        is the encoder's: cross-attention keeps a decoder token on its own segment's encoder tokens.
        With a cache (one plain decoder row per example), the tokens follow the cached ones."""
        layout = layout or AttentionLayout(causal=False)
        decoder_layout = decoder_layout or AttentionLayout()
        T, S, device = decoder_input_ids.shape[1], encoder_out.shape[1], decoder_input_ids.device
        if cache is not None:
            check_cacheable(decoder_layout, decoder_position_ids)
            decoder_position_ids = cache.next_positions(T, device)
            cache.append(decoder_position_ids)
            self_mask = lower(cache.allowed(T), None, T > 1, T, cache.length, device)
        else:
            self_mask = lower(self_allowed(decoder_layout, T, device), None, decoder_layout.causal, T, T, device)
        cross_mask = lower(cross_allowed(decoder_layout, layout, T, S, device), None, False, T, S, device)
        x = self.decoder.embed(self.shared(decoder_input_ids), decoder_position_ids)
        for i, layer in enumerate(self.decoder.layers):
            x = layer(x, encoder_out, self_mask, cross_mask, cache, i)
        return vocab_logits(x, self.lm_head.weight) + self.final_logits_bias

