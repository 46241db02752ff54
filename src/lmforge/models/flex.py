"""Lowering an attention layout to FlexAttention (`model.attention: flex`), once per forward.

The dense path (`masks.py`) materialises a [B, 1, T, T] mask, which is what SDPA takes but grows
with T² (4 GiB at 16 x 16K). FlexAttention instead takes a `BlockMask`: the same rule as a
`mask_mod` function, evaluated per 128 x 128 tile, so fully masked tiles (other documents, outside
a sliding window) are skipped and never stored. ALiBi becomes a `score_mod`. The rule below is the
dense one, term by term, so both paths compute the same attention (tested on CPU).

On CUDA the kernel is `torch.compile(flex_attention)` (fused, no score matrix); on CPU flex runs
torch's unfused reference implementation, which is only for checking: keep `sdpa` there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from lmforge.objectives.base import AttentionLayout


def _per_row(x: torch.Tensor, batch: int) -> torch.Tensor:
    return x.expand(batch, -1) if x.shape[0] == 1 else x


def layout_mask_mod(
    layout: AttentionLayout, batch: int, positions: torch.Tensor, window: int, sinks: int, device: torch.device
) -> Callable:
    """mask_mod(b, h, q, k) -> True where query q of row b may attend to key k: the rule of
    `masks.self_allowed` (causal, bidirectional prefix, same non-pad segment, padding sees itself,
    window and sinks by position id)."""
    causal = layout.causal
    prefix = None if layout.prefix is None else _per_row(layout.prefix.to(device), batch)
    seg = None if layout.segment_ids is None else _per_row(layout.segment_ids.to(device), batch)
    pos = _per_row(positions.to(device), batch)

    def mask_mod(b, h, q, k):
        ok = k <= q if causal else k >= 0
        if prefix is not None and causal:
            ok = ok | (prefix[b, q] & prefix[b, k])
        if seg is not None:
            ok = (ok & (seg[b, q] == seg[b, k]) & (seg[b, k] != 0)) | ((seg[b, q] == 0) & (q == k))
        if window > 0:
            near = pos[b, q] - pos[b, k] < window
            if sinks > 0:
                near = near | (pos[b, k] < sinks)
            ok = ok & near
        return ok

    return mask_mod


def build_block_mask(
    layout: AttentionLayout, seq_len: int, positions: torch.Tensor, window: int = 0, sinks: int = 0
) -> BlockMask:
    """One BlockMask for every layer of a stack. Batch size comes from the layout's per-row tensors
    (1 when every row shares the layout: the mask then broadcasts over the batch)."""
    device = positions.device
    rows = [t.shape[0] for t in (layout.segment_ids, layout.prefix, positions) if t is not None]
    batch = max(rows)
    mask_mod = layout_mask_mod(layout, batch, positions, window, sinks, device)
    # Compiled creation avoids evaluating the rule on the whole T x T grid at once (CUDA only).
    create = _compiled_mask() if device.type == "cuda" else create_block_mask
    return create(mask_mod, batch, None, seq_len, seq_len, device=device)


def alibi_score_mod(slopes: list[float], positions: torch.Tensor) -> Callable:
    """score_mod adding ALiBi's -slope_h * |pos_q - pos_k| to the scaled scores, as the dense path
    adds its bias to SDPA's."""
    slope = torch.tensor(slopes, dtype=torch.float32, device=positions.device)
    pos = positions

    def score_mod(score, b, h, q, k):
        row = b if pos.shape[0] > 1 else 0
        return score - slope[h] * (pos[row, q] - pos[row, k]).abs().to(score.dtype)

    return score_mod


@functools.cache
def _compiled_mask() -> Callable:
    return torch.compile(create_block_mask)


@functools.cache
def _compiled() -> Callable:
    return torch.compile(flex_attention, dynamic=False)


def flex_attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, score_mod: Callable | None,
    scale: float | None, enable_gqa: bool,
) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, H_kv, S, D] -> [B, H, T, D]; grouped-query heads read their kv head
    directly (no repeat)."""
    if q.is_cuda and q.shape[-1] < 16:  # else inductor fails deep inside its lowering
        raise ValueError(f"model.attention=flex needs a head dimension of at least 16 on CUDA (got {q.shape[-1]}): "
                         "raise model.d_model / model.n_heads, or use model.attention=sdpa")
    kernel = _compiled() if q.is_cuda else flex_attention
    return kernel(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
