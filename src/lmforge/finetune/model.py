"""A classification head on a pretrained body: each family's last hidden states, pooled the way
the family reads a whole text, then dropout and a Linear.

The models stay as pretraining built them; their hidden states are read with forward hooks (decoder,
encoder) or the encoder-decoder's own `encode`, so every family keeps a single forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lmforge.objectives.base import AttentionLayout

# decoder: the last real token, the only one a causal model lets see the whole text; encoder: [CLS]
# at position 0, which BERT pretrains as the sequence summary; encoder-decoder: the mean of the
# encoder's states, which no single position summarises.
POOLING = {"decoder": "last", "encoder": "cls", "encoder_decoder": "mean"}


def pool(hidden: torch.Tensor, real: torch.Tensor, how: str) -> torch.Tensor:
    """hidden [B, T, d] and the real-token mask [B, T] (right padding: real tokens first) -> [B, d]."""
    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        last = real.sum(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if how == "mean":
        weight = real.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weight).sum(1) / weight.sum(1).clamp_min(1.0)
    raise ValueError(f"pooling {how!r}: expected one of {sorted(set(POOLING.values()))}")


def hidden_states(model: nn.Module, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The last hidden states [B, T, d] of any family, padding masked out of attention."""
    family = model.cfg.family
    if family == "encoder_decoder":
        return model.encode(ids, _layout(real, causal=False))
    if family == "encoder":
        # No predicted positions: the MLM head runs on zero rows instead of the whole batch.
        no_mlm = torch.zeros_like(real)
        return _captured(model.layers[-1], lambda: model(ids, _layout(real, causal=False), predict_positions=no_mlm))
    # Right padding comes after every real token, so the causal mask alone keeps it out of their
    # states: no layout needed, and SDPA keeps its fused causal kernel.
    return _captured(model.norm, lambda: model(ids), trim=True)


def _layout(real: torch.Tensor, causal: bool) -> AttentionLayout:
    """Real tokens as segment 1, padding as segment 0 (attended by nothing); None when nothing is
    padded, so SDPA takes its mask-free kernel."""
    return AttentionLayout(causal=causal, segment_ids=None if bool(real.all()) else real.long())


def _captured(module: nn.Module, run: Callable[[], Any], trim: bool = False) -> torch.Tensor:
    """`module`'s output during `run()`. With `trim`, what the rest of the forward gets is cut to zero
    positions, so a decoder does not project every position onto the whole vocabulary for nothing."""
    seen: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        seen.append(output)
        return output[:, :0] if trim else None

    handle = module.register_forward_hook(hook)
    try:
        run()
    finally:
        handle.remove()
    return seen[-1]


class Classifier(nn.Module):
    """body -> pooled hidden state -> dropout -> Linear(d_model, n_labels)."""

    def __init__(self, body: nn.Module, n_labels: int, dropout: float = 0.1):
        super().__init__()
        self.body = body
        self.pooling = POOLING[body.cfg.family]
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(body.cfg.d_model, n_labels)
        with torch.no_grad():  # small logits at the start, as the body's own projections are drawn
            nn.init.normal_(self.head.weight, 0.0, 0.02)
            nn.init.zeros_(self.head.bias)

    def features(self, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """The pooled hidden state [B, d_model] the head reads."""
        return pool(hidden_states(self.body, ids, real), real, self.pooling)

    def forward(self, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """ids and real-token mask [B, T] -> class logits [B, n_labels]."""
        return self.head(self.dropout(self.features(ids, real)))
