"""A5: position encodings. Each is computed once per forward (per stack) from `position_ids`, then
every layer reuses it: RoPE rotates queries and keys; ALiBi and T5's relative bias add to the
attention scores; learned absolute positions are added to the embeddings by the model.

RoPE uses the Hugging Face Llama layout: the two rotated halves of a head are its first and second
half (rotate_half), not interleaved pairs as in the RoPE paper, so q/k weights export unpermuted.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos, sin: [B or 1, T, D] in fp32, cast to x's dtype as transformers does."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin


def default_positions(seq_len: int, device: torch.device | str, offset: int = 0) -> torch.Tensor:
    return torch.arange(offset, offset + seq_len, device=device)[None]


class RotaryEmbedding(nn.Module):
    """cos/sin for given positions. `scaling` extends a trained context by `factor`:
    - "linear" (position interpolation, Chen et al. 2023): positions divided by factor; transformers
      calls it rope_scaling {"rope_type": "linear"}.
    - "ntk" (NTK-aware, bloc97 2023): the base grows to theta * factor^(d / (d - 2)), which keeps the
      highest frequency and stretches the lowest by `factor`; exactly a Llama with that rope_theta.
    factor 1 is plain RoPE whatever the scaling. No buffers: tables stay fp32 under a bf16 cast and
    need no re-materialisation after meta-device init."""

    def __init__(self, head_dim: int, theta: float, scaling: str = "none", factor: float = 1.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head dimension, got {head_dim}")
        if scaling not in ("none", "linear", "ntk") or factor < 1.0:
            raise ValueError(f"rope scaling must be none/linear/ntk with factor >= 1, got {scaling!r}, {factor}")
        self.head_dim, self.theta, self.scaling, self.factor = head_dim, theta, scaling, factor

    @property
    def effective_theta(self) -> float:
        if self.scaling == "ntk":
            return self.theta * self.factor ** (self.head_dim / (self.head_dim - 2))
        return self.theta

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B or 1, T] -> (cos, sin), each [B or 1, T, head_dim] fp32."""
        device = position_ids.device
        steps = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
        inv_freq = 1.0 / (self.effective_theta ** (steps / self.head_dim))
        positions = position_ids.float()
        if self.scaling == "linear":
            positions = positions / self.factor
        freqs = positions[..., None] * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos(), angles.sin()

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}, scaling={self.scaling}, factor={self.factor}"


def alibi_slopes(n_heads: int) -> list[float]:
    """Head slopes of ALiBi (Press et al. 2022), as its reference `get_slopes` (used by BLOOM and MPT):
    a geometric sequence from 2^(-8/n) for a power-of-two n; otherwise the power of two below n,
    then every other slope of twice that count."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        return power_of_two(n_heads)
    closest = 2 ** math.floor(math.log2(n_heads))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: n_heads - closest]


class ALiBi(nn.Module):
    """Additive bias -slope_h * |i - j| (distances from position ids, so packed documents restart)."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.slopes = alibi_slopes(n_heads)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """q_pos [B or 1, T], k_pos [B or 1, S] -> bias [B or 1, H, T, S] fp32."""
        distance = (q_pos[:, :, None] - k_pos[:, None, :]).abs().float()
        slopes = torch.tensor(self.slopes, dtype=torch.float32, device=q_pos.device)
        return -slopes[None, :, None, None] * distance[:, None]


def t5_relative_bucket(
    relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucketing of relative positions (key - query): exact for small distances, logarithmic up
    to max_distance, the last bucket beyond; bidirectional stacks split the buckets by sign."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative > 0).long() * num_buckets
        relative = relative.abs()
    else:
        relative = -torch.clamp(relative, max=0)
    max_exact = num_buckets // 2
    is_small = relative < max_exact
    scaled = torch.log(relative.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (scaled * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, relative, large)


class T5RelativeBias(nn.Module):
    """Learned scalar bias per (bucket, head), computed once per stack and shared by its layers.
    The parameter is named as in transformers' T5 (`relative_attention_bias`)."""

    def __init__(self, n_heads: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True):
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.relative_attention_bias = nn.Embedding(num_buckets, n_heads)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """q_pos [B or 1, T], k_pos [B or 1, S] -> bias [B or 1, H, T, S] (fp32)."""
        relative = k_pos[:, None, :] - q_pos[:, :, None]
        bucket = t5_relative_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(bucket).permute(0, 3, 1, 2).float()
