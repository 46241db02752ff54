"""The objective seam: token windows in, (inputs, labels, loss mask, attention layout) out.

Models read only the layout; they never know which objective produced it, so prefix LM, FIM,
span corruption, MLM and UL2 differ from next-token LM only in `Objective.__call__`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.registry import Registry

OBJECTIVES = Registry("objective")


def _move(t: torch.Tensor | None, device: torch.device | str) -> torch.Tensor | None:
    return None if t is None else t.to(device)


@dataclass
class AttentionLayout:
    """Who may attend to whom. `doc_ids` keeps attention inside a document for packed rows."""

    kind: Literal["causal", "prefix", "bidirectional"] = "causal"
    prefix_len: torch.Tensor | None = None  # [B]; positions < prefix_len see each other (kind="prefix")
    doc_ids: torch.Tensor | None = None  # [B, T]; attend only where equal

    def mask(self, seq_len: int, device: torch.device | str) -> torch.Tensor | None:
        """Boolean [B or 1, 1, T, T] mask (True = may attend), or None for plain causal attention."""
        if self.kind == "causal" and self.doc_ids is None:
            return None
        i = torch.arange(seq_len, device=device)
        allowed = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)[None]
        if self.kind in ("causal", "prefix"):
            allowed = (i[None, :] <= i[:, None])[None]
        if self.kind == "prefix":
            assert self.prefix_len is not None, "prefix layout needs prefix_len"
            in_prefix = i[None, :] < self.prefix_len.to(device)[:, None]  # [B, T]
            allowed = allowed | (in_prefix[:, None, :] & in_prefix[:, :, None])
        if self.doc_ids is not None:
            d = self.doc_ids.to(device)
            allowed = allowed & (d[:, :, None] == d[:, None, :])
        return allowed[:, None]

    def to(self, device: torch.device | str) -> AttentionLayout:
        return replace(self, prefix_len=_move(self.prefix_len, device), doc_ids=_move(self.doc_ids, device))


@dataclass
class Example:
    input_ids: torch.Tensor  # [B, T] int64
    labels: torch.Tensor  # [B, T'] int64; T' = T except for encoder-decoder objectives
    loss_mask: torch.Tensor  # [B, T'] float32, 1 where the label counts
    layout: AttentionLayout
    decoder_input_ids: torch.Tensor | None = None  # [B, T'] for encoder-decoder objectives (T5, BART)

    def model_inputs(self) -> dict[str, object]:
        """Keyword arguments for any registered model: callers never branch on the architecture."""
        inputs: dict[str, object] = {"input_ids": self.input_ids, "layout": self.layout}
        if self.decoder_input_ids is not None:
            inputs["decoder_input_ids"] = self.decoder_input_ids
        return inputs

    def to(self, device: torch.device | str) -> Example:
        return Example(
            self.input_ids.to(device),
            self.labels.to(device),
            self.loss_mask.to(device),
            self.layout.to(device),
            _move(self.decoder_input_ids, device),
        )


class Objective(Protocol):
    def window(self, seq_len: int) -> int:
        """Raw tokens per row the loader must deliver for model inputs of length seq_len."""
        ...

    def __call__(self, tokens: np.ndarray, doc_ids: np.ndarray, rng: np.random.Generator) -> Example:
        """tokens, doc_ids: [B, window] arrays from the loader."""
        ...


def build_objective(name: str, **options: object) -> Objective:
    return OBJECTIVES.build(name, where="objective.options", name_key="objective.name", **options)


def masked_nll(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed loss (nats, fp32) over positions where loss_mask is 1. Callers divide by the mask total
    of the whole step, so micro-batches (and later ranks) with more target tokens weigh more."""
    losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    return (losses * loss_mask.flatten().float()).sum()
