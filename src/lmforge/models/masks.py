"""Lowering attention layouts to what SDPA takes, once per batch (every layer reuses the result).

A plain causal layout with no bias lowers to nothing at all, so SDPA runs its fused causal kernel;
anything else becomes one boolean [B or 1, 1, T, S] mask (True = may attend), folded with a
position bias (ALiBi, T5) into one additive float mask when the model has one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lmforge.objectives.base import AttentionLayout


@dataclass
class AttnMask:
    """What every attention layer of one stack gets: `is_causal` for SDPA's fused path, else
    `attn_mask` (bool, or float with the position bias folded in), or for FlexAttention a
    `block_mask` with an optional `score_mod` (see flex.py)."""

    is_causal: bool = False
    attn_mask: torch.Tensor | None = None
    block_mask: Any = None
    score_mod: Callable | None = None


def self_allowed(
    layout: AttentionLayout,
    seq_len: int,
    device: torch.device | str,
    positions: torch.Tensor | None = None,
    window: int = 0,
    sinks: int = 0,
) -> torch.Tensor | None:
    """Boolean [B or 1, 1, T, T] self-attention mask, or None when it is plain causal.

    `window` > 0 keeps a query at (segment) position p on keys at positions > p - window, plus the
    first `sinks` positions of its segment (attention sinks, StreamingLLM). A padding query attends
    to itself only, so no row of scores is all -inf. None also for a plain bidirectional layout (an
    encoder row without segments): SDPA needs no mask for it."""
    plain = layout.segment_ids is None and layout.prefix is None
    if plain and window <= 0:
        return None
    i = torch.arange(seq_len, device=device)
    if layout.causal:
        allowed = (i[None, :] <= i[:, None])[None]
    else:
        allowed = torch.ones(1, seq_len, seq_len, dtype=torch.bool, device=device)
    if layout.prefix is not None and layout.causal:
        p = layout.prefix.to(device)
        allowed = allowed | (p[:, :, None] & p[:, None, :])
    if layout.segment_ids is not None:
        seg = layout.segment_ids.to(device)
        allowed = allowed & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
        allowed = allowed | ((seg == 0)[:, :, None] & torch.eye(seq_len, dtype=torch.bool, device=device))
    if window > 0:
        pos = positions if positions is not None else i[None]
        distance = pos[:, :, None] - pos[:, None, :]
        in_window = distance < window
        if sinks > 0:
            in_window = in_window | (pos[:, None, :] < sinks)
        allowed = allowed & in_window
    return allowed[:, None]


def cross_allowed(
    q_layout: AttentionLayout, kv_layout: AttentionLayout, q_len: int, kv_len: int, device: torch.device | str
) -> torch.Tensor | None:
    """Boolean [B or 1, 1, T, S] decoder -> encoder mask: same segment and not padding; None when
    neither side has segments (every decoder token sees the whole encoder row)."""
    q_seg, kv_seg = q_layout.segment_ids, kv_layout.segment_ids
    if q_seg is None and kv_seg is None:
        return None
    if q_seg is None:
        q_seg = torch.ones(1, q_len, dtype=torch.long, device=device)
    if kv_seg is None:
        kv_seg = torch.ones(1, kv_len, dtype=torch.long, device=device)
    q_seg, kv_seg = q_seg.to(device), kv_seg.to(device)
    allowed = (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] != 0)
    # A query with no key (padding, or a segment the encoder lacks) sees every key instead of none:
    # its output is never used, and an all -inf row would put NaN into the gradients.
    empty = ~allowed.any(-1, keepdim=True)
    return (allowed | empty)[:, None]


def causal_allowed(q_len: int, kv_len: int, device: torch.device | str) -> torch.Tensor:
    """[1, 1, T, S] causal mask whose T queries are the last T of the S keys (decoding with a cache)."""
    i = torch.arange(kv_len - q_len, kv_len, device=device)
    return (torch.arange(kv_len, device=device)[None, :] <= i[:, None])[None, None]


def lower(allowed: torch.Tensor | None, bias: torch.Tensor | None, causal_if_none: bool, q_len: int,
          kv_len: int, device: torch.device | str) -> AttnMask:
    """Fold a boolean mask and an additive bias [B or 1, H, T, S] into one AttnMask."""
    if bias is None:
        if allowed is None:
            return AttnMask(is_causal=causal_if_none)
        return AttnMask(attn_mask=allowed)
    if allowed is None and causal_if_none:
        allowed = causal_allowed(q_len, kv_len, device)
    if allowed is not None:
        bias = bias.masked_fill(~allowed, float("-inf"))
    return AttnMask(attn_mask=bias)
