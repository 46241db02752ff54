"""O2: prefix LM on a decoder (the prefix decoder is the decoder read with a prefix layout).

Every document piece of a packed row gets its own split point, uniform in [1, L-1] over the piece's
L input tokens: the tokens before it see each other both ways, the rest is causal, and only the
predictions of tokens after the split are scored. A position inside the prefix sees the next token,
so scoring it would leak its target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from lmforge.config import ObjectiveConfig
from lmforge.objectives.base import OBJECTIVES, AttentionLayout, Batch, Example, ObjectiveContext, row_rng
from lmforge.objectives.packing import document_spans, segment_positions, separator_segments


@dataclass
class PrefixLMConfig(ObjectiveConfig):
    """Bidirectional prefix, causal suffix, loss on the suffix only (T5's prefix_lm, per document)."""

    families: ClassVar[tuple[str, ...]] = ("decoder",)
    name: str = "prefix_lm"


@OBJECTIVES.register("prefix_lm", config=PrefixLMConfig)
class PrefixLM:
    short_rows = True  # works on any row length: evaluation's last, shorter window included

    def __init__(self, cfg: PrefixLMConfig, ctx: ObjectiveContext):
        self.cfg = cfg
        self.eos = ctx.special.eos
        self.seed = ctx.seed

    def window(self, seq_len: int) -> int:
        return seq_len + 1

    def __call__(self, batch: Batch) -> Example:
        tokens = np.ascontiguousarray(batch.tokens, dtype=np.int64)
        # The EOS closing a document opens the next piece (as with lm's document_mask): it is the
        # token that predicts the next document's first token, so it must see nothing before it.
        segments = separator_segments(tokens[:, :-1], batch.doc_ids[:, :-1], self.eos)
        prefix = np.zeros(segments.shape, dtype=bool)
        loss_mask = np.zeros(segments.shape, dtype=np.float32)
        for row, sample_id in enumerate(batch.sample_ids):
            rng = row_rng(self.seed, int(sample_id))
            for start, stop in document_spans(segments[row]):
                if stop - start < 2:
                    continue  # one token (a lone EOS at the row's end) has no split: it stays loss-free
                split = start + int(rng.integers(1, stop - start))
                prefix[row, start:split] = True
                # Position t predicts token t+1: from split-1 on, every target lies after the split.
                loss_mask[row, split - 1 : stop] = 1.0
        t = torch.from_numpy(tokens)
        layout = AttentionLayout(causal=True, segment_ids=torch.from_numpy(segments), prefix=torch.from_numpy(prefix))
        return Example(
            t[:, :-1], t[:, 1:], torch.from_numpy(loss_mask), layout,
            position_ids=torch.from_numpy(segment_positions(segments)),
        )
