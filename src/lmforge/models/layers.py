"""Building blocks shared by the families. Llama-style names (q_proj, o_proj, gate_proj, ...) so the
decoder exports to transformers by copying; other families map names in their export.

Modules here allocate parameters only; values are set by each model's `init_weights()`, so a model
can be built on the meta device and parallelised before it is initialised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.flex import flex_attend
from lmforge.models.masks import AttnMask
from lmforge.models.positions import apply_rotary

# cuBLAS has fast Hopper tensor-core kernels for a bf16 output dimension that is a multiple of 8;
# GPT-2's 50,257 fell back to an sm75 CUTLASS kernel on an H200: the three vocabulary matmuls took
# ~40 ms a step each at 125M, 5-6x their FLOPs' time (BENCHMARKS.md). nanoGPT pads the vocabulary to
# 50,304 instead; padding the matmul alone keeps checkpoints, exports and logits at the true size.
VOCAB_ALIGN = 64


def vocab_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., d] @ weight[V, d].T (+ bias) -> [..., V]: the output projection of every family, with
    the matmul padded to a multiple of VOCAB_ALIGN rows on CUDA."""
    if x.is_cuda and weight.shape[0] % VOCAB_ALIGN and type(weight) in (torch.Tensor, nn.Parameter):
        return padded_linear(x, weight, bias, VOCAB_ALIGN)
    return F.linear(x, weight, bias)


def padded_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, align: int) -> torch.Tensor:
    """F.linear through a weight padded with zero rows to a multiple of `align`, sliced back: the same
    values and gradients (the padded rows' outputs are dropped before anything reads them)."""
    rows = weight.shape[0]
    out = F.linear(x, F.pad(weight, (0, 0, 0, -rows % align)))[..., :rows]
    return out if bias is None else out + bias


class RMSNorm(nn.Module):
    """Normalised in fp32 and cast back before the weight, exactly like LlamaRMSNorm (and T5's
    LayerNorm, which is the same function), so bf16 runs match the exported model."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class KVCache:
    """Keys and values of past positions per layer, for incremental decoding."""

    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return next(iter(self.keys.values())).shape[2] if self.keys else 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.keys:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class Attention(nn.Module):
    """Multi-head attention: grouped-query heads (n_kv_heads key/value heads shared by n_heads /
    n_kv_heads query heads each), `head_dim` independent of d_model (T5's d_kv), optional biases,
    a score scale (None = 1/sqrt(head_dim); T5 uses 1), self- or cross-attention, a KV cache."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = False,
        scale: float | None = None,
        kv_dim: int | None = None,
    ):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = head_dim or d_model // n_heads
        self.scale = scale
        kv_dim = kv_dim or d_model
        self.q_proj = nn.Linear(d_model, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(kv_dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(kv_dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d_model, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        mask: AttnMask,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_input: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer_idx: int = 0,
    ) -> torch.Tensor:
        """x [B, T, d]; kv_input [B, S, kv_dim] for cross-attention (None: self-attention);
        rope (cos, sin) rotates q and k (self-attention only)."""
        B, T, _ = x.shape
        src = x if kv_input is None else kv_input
        S = src.shape[1]
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(src).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(src).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        grouped = self.n_kv_heads != self.n_heads
        if mask.block_mask is not None:
            y = flex_attend(q, k, v, mask.block_mask, mask.score_mod, self.scale, grouped)
        elif mask.attn_mask is None:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=mask.is_causal, scale=self.scale, enable_gqa=grouped
            )
        else:
            # SDPA's enable_gqa runs only on the flash and math kernels, and flash takes no mask: with
            # both, CUDA silently falls back to math, which materialises fp32 [B, H, T, S] scores.
            # Full-size k/v let the memory-efficient kernel take the mask.
            k, v = self._repeat_kv(k), self._repeat_kv(v)
            attn_mask = mask.attn_mask
            if attn_mask.is_floating_point():
                attn_mask = attn_mask.to(q.dtype)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        """[B, n_kv_heads, S, D] -> [B, n_heads, S, D]; query head h reads kv head h // group, the
        grouping of transformers' repeat_kv (and of enable_gqa), so exported weights mean the same."""
        group = self.n_heads // self.n_kv_heads
        return x if group == 1 else x.repeat_interleave(group, dim=1)
