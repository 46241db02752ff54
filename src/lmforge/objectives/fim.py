"""O3: fill in the middle (Bavarian et al. 2022), context-level as in BigCode's Megatron.

Each document fragment of a packed row is, with probability `fim_rate`, decoded to text, cut at two
character positions drawn uniformly (on the Python str, so a multi-byte character is never split),
and its three pieces re-encoded separately:

    PSM  <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle
    SPM  <fim_prefix><fim_suffix> suffix <fim_middle> prefix middle   (probability spm_rate)

then trained with ordinary next-token loss. The fragments are joined again with their EOS and the
row is cut back (or padded with <fim_pad>, which carries no loss) to its original length.

A document's leading language tag (tokens.language_tags) stays in front, untransformed, like its EOS
at the end. Fragments cut by the window edge (the row's first and last) are transformed like whole documents:
a sample is whatever its window holds, as in BigCode. A fragment whose tokens do not decode to
clean text (the window cut a multi-byte character) stays as it is, since re-encoding would change
it. Tokens pushed past the row's end by the sentinels and re-tokenisation are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from lmforge.config import ObjectiveConfig, check
from lmforge.objectives.base import OBJECTIVES, AttentionLayout, Batch, Example, ObjectiveContext, row_rng
from lmforge.objectives.packing import document_spans

NEEDED_BY = "objective fim"


@dataclass
class FIMConfig(ObjectiveConfig):
    families: ClassVar[tuple[str, ...]] = ("decoder",)
    name: str = "fim"
    fim_rate: float = 0.5  # share of document fragments transformed (BigCode)
    spm_rate: float = 0.5  # share of transformed fragments in SPM rather than PSM order

    def validate(self, where: str) -> None:
        check(where, "fim_rate", 0.0 <= self.fim_rate <= 1.0, "must be in [0, 1]", self.fim_rate)
        check(where, "spm_rate", 0.0 <= self.spm_rate <= 1.0, "must be in [0, 1]", self.spm_rate)


@OBJECTIVES.register("fim", config=FIMConfig)
class FillInTheMiddle:
    short_rows = True  # output keeps each row's length, whatever it is

    def __init__(self, cfg: FIMConfig, ctx: ObjectiveContext):
        if ctx.tokenizer is None:
            raise ValueError(f"{NEEDED_BY} re-encodes text: its ObjectiveContext needs the tokenizer")
        self.cfg = cfg
        self.tokenizer = ctx.tokenizer
        self.seed = ctx.seed
        self.eos = ctx.special.eos
        self.prefix_id = ctx.special.require("fim_prefix", NEEDED_BY)
        self.middle_id = ctx.special.require("fim_middle", NEEDED_BY)
        self.suffix_id = ctx.special.require("fim_suffix", NEEDED_BY)
        self.pad_id = ctx.special.require("fim_pad", NEEDED_BY)
        self.tags = frozenset(ctx.special.lang_tags.values())  # a document's leading language tag stays first

    def window(self, seq_len: int) -> int:
        return seq_len + 1

    def __call__(self, batch: Batch) -> Example:
        rows = [
            self.transform_row(np.asarray(tokens, dtype=np.int64), np.asarray(doc_ids), int(sample_id))
            for tokens, doc_ids, sample_id in zip(batch.tokens, batch.doc_ids, batch.sample_ids, strict=True)
        ]
        t = torch.from_numpy(np.stack(rows))
        labels = t[:, 1:]
        # Padding sits only at the row's end, so causal attention already hides it from real tokens.
        loss_mask = (labels != self.pad_id).float()
        return Example(t[:, :-1], labels, loss_mask, AttentionLayout(causal=True))

    def transform_row(self, tokens: np.ndarray, doc_ids: np.ndarray, sample_id: int) -> np.ndarray:
        """One raw row [W] -> the row with its fragments transformed, cut or padded back to W tokens."""
        rng = row_rng(self.seed, sample_id)
        out: list[int] = []
        for start, stop in document_spans(doc_ids):
            closed = bool(tokens[stop - 1] == self.eos)  # the EOS carries the id of the document it ends
            ids = tokens[start : stop - closed].tolist()
            # tokens.language_tags: the tag is no text to cut (decoded, a cut could split it into text)
            tagged = bool(ids) and ids[0] in self.tags
            out += ids[:tagged] + self._fragment(ids[tagged:], rng)
            if closed:
                out.append(self.eos)
        width = len(tokens)
        return np.asarray(out[:width] + [self.pad_id] * (width - len(out)), dtype=np.int64)

    def _fragment(self, ids: list[int], rng: np.random.Generator) -> list[int]:
        if rng.random() >= self.cfg.fim_rate or not ids:
            return ids
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        if "\ufffd" in text:  # a character cut by the window edge: the text is not the tokens
            return ids
        lo, hi = sorted(int(c) for c in rng.integers(0, len(text) + 1, size=2))
        prefix, middle, suffix = (self._encode(piece) for piece in (text[:lo], text[lo:hi], text[hi:]))
        if rng.random() < self.cfg.spm_rate:
            return [self.prefix_id, self.suffix_id, *suffix, self.middle_id, *prefix, *middle]
        return [self.prefix_id, *prefix, self.suffix_id, *suffix, self.middle_id, *middle]

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids if text else []
