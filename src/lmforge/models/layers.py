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
    """What incremental decoding keeps between forwards: per layer, the self-attention keys and
    values of every past position and the cross-attention keys and values of the encoder output
    (computed once); plus, shared by the layers, the cached keys' position ids and which of them are
    real (left padding of a batch of unequal prompts is not). The model appends positions once per
    forward (`append`), before its layers append their keys (`update`)."""

    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    cross: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    positions: torch.Tensor | None = None  # [B or 1, S] long
    valid: torch.Tensor | None = None  # [B, S] bool; None: every cached key is real

    @property
    def length(self) -> int:
        return 0 if self.positions is None else self.positions.shape[1]

    def next_positions(self, n: int, device: torch.device | str) -> torch.Tensor:
        """Position ids [B or 1, n] continuing each row after its last cached key."""
        steps = torch.arange(n, device=device)[None]
        return steps if self.positions is None else self.positions[:, -1:] + 1 + steps

    def append(self, positions: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Record the position ids [B or 1, T] (and realness [B, T], None = all real) of T new keys."""
        old = self.length
        if self.positions is None:
            self.positions = positions
        else:
            rows = max(self.positions.shape[0], positions.shape[0])
            self.positions = torch.cat([self.positions.expand(rows, -1), positions.expand(rows, -1)], dim=1)
        if valid is None and self.valid is None:
            return
        if valid is None:
            valid = torch.ones(self.valid.shape[0], positions.shape[1], dtype=torch.bool, device=positions.device)
        if self.valid is None:
            self.valid = torch.ones(valid.shape[0], old, dtype=torch.bool, device=valid.device)
        self.valid = torch.cat([self.valid, valid], dim=1)

    def allowed(self, n_new: int) -> torch.Tensor | None:
        """Boolean [B or 1, 1, T, S] self-attention mask of the last `n_new` keys as queries: causal,
        never onto padding (a padding query sees itself only, so no row of scores is all -inf). None
        when the plain causal rule needs no tensor: no padding, and one query or nothing cached before
        (lower it with causal_if_none = n_new > 1)."""
        S = self.length
        if self.valid is None and (n_new == 1 or n_new == S):
            return None
        device = self.positions.device
        queries = torch.arange(S - n_new, S, device=device)[:, None]
        keys = torch.arange(S, device=device)[None]
        allowed = (keys <= queries)[None, None]
        if self.valid is not None:
            allowed = allowed & (self.valid[:, None, None, :] | (keys == queries))
        return allowed

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append one layer's new keys and values [B, H, T, D]; return all of them."""
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
        rope (cos, sin) rotates q and k (self-attention only). With a cache, self-attention appends
        its keys to it and attends to all cached ones; cross-attention projects kv_input once."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        if kv_input is not None and cache is not None and layer_idx in cache.cross:
            k, v = cache.cross[layer_idx]  # the encoder output does not change while decoding
        else:
            k, v = self._project_kv(x if kv_input is None else kv_input)
        if rope is not None:
            cos, sin = rope
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
        if cache is not None and kv_input is None:
            k, v = cache.update(layer_idx, k, v)
        elif cache is not None:
            cache.cross[layer_idx] = (k, v)
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

    def _project_kv(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src [B, S, kv_dim] -> keys and values [B, n_kv_heads, S, head_dim]."""
        B, S, _ = src.shape
        k = self.k_proj(src).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(src).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        """[B, n_kv_heads, S, D] -> [B, n_heads, S, D]; query head h reads kv head h // group, the
        grouping of transformers' repeat_kv (and of enable_gqa), so exported weights mean the same."""
        group = self.n_heads // self.n_kv_heads
        return x if group == 1 else x.repeat_interleave(group, dim=1)
