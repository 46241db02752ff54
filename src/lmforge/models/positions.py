"""Rotary position embedding in the Hugging Face Llama layout.

The two rotated halves of each head are the first and second half of its dimensions (rotate_half),
not interleaved pairs as in the RoPE paper, so q_proj/k_proj weights export to Llama unpermuted.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos, sin: [T, D] in fp32, cast to x's dtype as transformers does."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions 0..T-1. Held in a cache per device rather than in buffers, so they
    stay fp32 when the model is cast to bf16 and need no re-materialisation after meta-device init."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head dimension, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._cache.get(device)
        if cached is None or cached[0].shape[0] < seq_len:
            steps = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
            inv_freq = 1.0 / (self.theta ** (steps / self.head_dim))
            positions = torch.arange(seq_len, dtype=torch.float32, device=device)
            freqs = torch.outer(positions, inv_freq)
            angles = torch.cat((freqs, freqs), dim=-1)
            cached = (angles.cos(), angles.sin())
            self._cache[device] = cached
        cos, sin = cached
        return cos[:seq_len], sin[:seq_len]

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"
