"""A1/A2: the decoder (Llama architecture). A prefix decoder is the same model read with a prefix
attention layout; the objective decides, the model only follows the layout."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from lmforge.config import ModelConfig, check
from lmforge.models import init
from lmforge.models.flex import alibi_score_mod, build_block_mask
from lmforge.models.layers import Attention, KVCache, RMSNorm, SwiGLU, vocab_logits
from lmforge.models.masks import AttnMask, causal_allowed, lower, self_allowed
from lmforge.models.positions import ALiBi, RotaryEmbedding, default_positions
from lmforge.models.registry import ARCHITECTURES
from lmforge.objectives.base import AttentionLayout


@dataclass
class DecoderConfig(ModelConfig):
    family: ClassVar[str] = "decoder"

    arch: str = "decoder"
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 -> n_heads (no grouped-query attention)
    d_ff: int = 0  # 0 -> SwiGLU default: 8/3 * d_model rounded up to a multiple of 64
    position: Literal["rope", "alibi", "learned"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: Literal["none", "linear", "ntk"] = "none"  # extends a trained model's context
    rope_factor: float = 1.0
    sliding_window: int = 0  # > 0: attend to the last `sliding_window` positions only
    attention_sinks: int = 0  # with a window: the first positions of a document stay visible
    # How a non-plain layout (packed documents, prefix, window, ALiBi) is lowered: "sdpa", a dense
    # [B, 1, T, T] mask; "flex", a FlexAttention block mask that skips masked tiles (for long rows
    # on GPU). A plain causal layout takes SDPA's fused kernel either way.
    attention: Literal["sdpa", "flex"] = "sdpa"
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    def validate(self, where: str) -> None:
        super().validate(where)
        check(where, "d_model", self.d_model > 0, "must be > 0", self.d_model)
        check(where, "n_layers", self.n_layers > 0, "must be > 0", self.n_layers)
        check(where, "n_heads", self.n_heads > 0 and self.d_model % self.n_heads == 0,
              f"must divide {where}.d_model ({self.d_model})", self.n_heads)
        kv_ok = self.n_kv_heads == 0 or (self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0)
        check(where, "n_kv_heads", kv_ok, f"must divide {where}.n_heads ({self.n_heads})", self.n_kv_heads)
        if self.position == "rope":
            check(where, "n_heads", (self.d_model // self.n_heads) % 2 == 0,
                  "must leave an even head dimension for RoPE", self.n_heads)
        check(where, "d_ff", self.d_ff >= 0, "must be >= 0 (0 = 8/3 d_model)", self.d_ff)
        check(where, "rope_factor", self.rope_factor >= 1.0, "must be >= 1", self.rope_factor)
        check(where, "sliding_window", self.sliding_window >= 0, "must be >= 0 (0 = off)", self.sliding_window)
        sinks_ok = self.attention_sinks == 0 or (self.attention_sinks > 0 and self.sliding_window > 0)
        check(where, "attention_sinks", sinks_ok, "must be >= 0 and needs sliding_window", self.attention_sinks)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def resolved_d_ff(self) -> int:
        """d_ff, or for 0 the SwiGLU width 8/3 * d_model (as many parameters as a 4x GELU MLP),
        rounded up to a multiple of 64 for matmul-friendly shapes."""
        if self.d_ff > 0:
            return self.d_ff
        return -(-8 * self.d_model // (3 * 64)) * 64  # integer ceil: no float rounding at exact multiples


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.resolved_d_ff())

    def forward(self, x: torch.Tensor, mask: AttnMask, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None = None, layer_idx: int = 0) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), mask, rope, cache=cache, layer_idx=layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


@ARCHITECTURES.register("decoder", config=DecoderConfig)
class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.position == "learned":
            self.embed_positions = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor)
        self.alibi = ALiBi(cfg.n_heads) if cfg.position == "alibi" else None

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, init_std); residual output projections scaled by 1/sqrt(2 n_layers), since each layer
        adds two of them to the residual stream (GPT-2)."""
        std, residual_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                init.normal_(module.weight, 0.0, residual_std if name.endswith(("o_proj", "down_proj")) else std)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()

    def forward(
        self,
        input_ids: torch.Tensor,
        layout: AttentionLayout | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab_size]. With a cache, the T tokens follow the cached
        ones (positions continue each row's) and their keys are appended to it."""
        T, device = input_ids.shape[1], input_ids.device
        if cache is not None:
            position_ids, mask = self._cached_mask(layout or AttentionLayout(), position_ids, T, cache, device)
        else:
            if position_ids is None:
                position_ids = default_positions(T, device)
            mask = self._mask(layout or AttentionLayout(), position_ids, T, device)
        x = self.embed_tokens(input_ids)
        if self.cfg.position == "learned":
            x = x + self.embed_positions(position_ids)
        rope = self.rope(position_ids) if self.cfg.position == "rope" else None
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, rope, cache, i)
        return vocab_logits(self.norm(x), self.lm_head.weight)

    def _mask(self, layout: AttentionLayout, positions: torch.Tensor, T: int, device: torch.device) -> AttnMask:
        """Built once per forward; None (the fused causal kernel) for the plain causal case."""
        window, sinks = self.cfg.sliding_window, self.cfg.attention_sinks
        if self.cfg.attention == "flex" and not (layout.is_plain_causal and window == 0 and self.alibi is None):
            score_mod = alibi_score_mod(self.alibi.slopes, positions) if self.alibi is not None else None
            return AttnMask(block_mask=build_block_mask(layout, T, positions, window, sinks), score_mod=score_mod)
        allowed = self_allowed(layout, T, device, positions, window, sinks)
        bias = self.alibi(positions, positions) if self.alibi is not None else None
        return lower(allowed, bias, layout.causal, T, T, device)

    def _cached_mask(self, layout: AttentionLayout, positions: torch.Tensor | None, T: int, cache: KVCache,
                     device: torch.device) -> tuple[torch.Tensor, AttnMask]:
        """Positions of the T new tokens and their mask over every cached key. A layout may only mark
        padding (segment id 0, e.g. the left padding of unequal prompts): one document per row."""
        if not layout.causal or layout.prefix is not None:
            raise ValueError("KV-cached decoding supports causal layouts without a prefix only")
        valid = None
        if layout.segment_ids is not None:
            if bool((layout.segment_ids > 1).any()):
                raise ValueError("KV-cached decoding takes one segment per row (segment ids 0 = padding, 1)")
            valid = layout.segment_ids.to(device) != 0
        if positions is None:
            positions = cache.next_positions(T, device)
        cache.append(positions, valid)
        allowed, keys = cache.allowed(T), cache.positions
        if self.cfg.sliding_window:
            ok = positions[:, :, None] - keys[:, None, :] < self.cfg.sliding_window
            if self.cfg.attention_sinks:
                ok = ok | (keys[:, None, :] < self.cfg.attention_sinks)
            causal = causal_allowed(T, cache.length, device) if allowed is None else allowed
            allowed = causal & ok[:, None]
        bias = self.alibi(positions, keys) if self.alibi is not None else None
        return positions, lower(allowed, bias, T > 1, T, cache.length, device)
