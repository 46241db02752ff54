"""O1: next-token language modelling over packed windows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from lmforge.config import ObjectiveConfig
from lmforge.objectives.base import OBJECTIVES, AttentionLayout, Batch, Example, ObjectiveContext
from lmforge.objectives.packing import segment_positions, separator_segments


@dataclass
class LMConfig(ObjectiveConfig):
    """Predict token t+1 from tokens <= t. With `document_mask`, attention (and positions, which
    matter for learned and absolute encodings) stay inside a document."""

    families: ClassVar[tuple[str, ...]] = ("decoder",)
    name: str = "lm"
    document_mask: bool = False


@OBJECTIVES.register("lm", config=LMConfig)
class NextTokenLM:
    short_rows = True

    def __init__(self, cfg: LMConfig, ctx: ObjectiveContext):
        self.cfg = cfg
        self.eos = ctx.special.eos

    def window(self, seq_len: int) -> int:
        return seq_len + 1

    def __call__(self, batch: Batch) -> Example:
        t = torch.from_numpy(np.ascontiguousarray(batch.tokens, dtype=np.int64))
        inputs, labels = t[:, :-1], t[:, 1:]
        layout, positions = AttentionLayout(causal=True), None
        if self.cfg.document_mask:
            segments = separator_segments(batch.tokens[:, :-1], batch.doc_ids[:, :-1], self.eos)
            layout.segment_ids = torch.from_numpy(segments)
            positions = torch.from_numpy(segment_positions(segments))
        return Example(inputs, labels, torch.ones(labels.shape, dtype=torch.float32), layout, position_ids=positions)
