"""O1: next-token language modelling over packed windows."""

from __future__ import annotations

import numpy as np
import torch

from lmforge.objectives.base import OBJECTIVES, AttentionLayout, Example


@OBJECTIVES.register("lm")
class NextTokenLM:
    """Predict token t+1 from tokens <= t. With `document_mask`, attention stays inside a document."""

    def __init__(self, document_mask: bool = False):
        self.document_mask = document_mask

    def window(self, seq_len: int) -> int:
        return seq_len + 1

    def __call__(self, tokens: np.ndarray, doc_ids: np.ndarray, rng: np.random.Generator) -> Example:
        t = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
        inputs, labels = t[:, :-1], t[:, 1:]
        layout = AttentionLayout("causal")
        if self.document_mask:
            layout.doc_ids = torch.from_numpy(np.ascontiguousarray(doc_ids[:, :-1], dtype=np.int64))
        return Example(inputs, labels, torch.ones(labels.shape, dtype=torch.float32), layout)
