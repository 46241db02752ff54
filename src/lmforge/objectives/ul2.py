"""O6: UL2's mixture of denoisers (UL2 §3.1): R (regular span corruption) with [NLU], S (prefix LM)
with [S2S], X (extreme: long spans or high rates) with [NLG]; the mode token opens the encoder input.

Each row draws one denoiser by weight from its own rng. All denoisers share one window and one
target length so their rows stack: the window is the longest raw row every denoiser fits in
seq_len, the target length the longest target any of them makes from it (rows with shorter
targets are padded). Default weights are uniform over the seven denoisers of the paper's table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np

from lmforge.config import ObjectiveConfig, check
from lmforge.objectives.base import OBJECTIVES, Batch, Example, ObjectiveContext
from lmforge.objectives.span_corruption import PieceNoise, Seq2SeqRows, SpanNoise, longest_piece, seq_len_for


@dataclass
class Denoiser:
    """R and X: T5 span corruption with mean span `mean_span` and noise density `rate`.
    S: prefix LM whose target is the last `rate` share of the piece (`mean_span` unused)."""

    kind: Literal["R", "S", "X"]
    mean_span: float = 3.0
    rate: float = 0.15
    weight: float = 1.0


def paper_denoisers() -> list[Denoiser]:
    return [
        Denoiser("R", 3.0, 0.15), Denoiser("R", 8.0, 0.15),
        Denoiser("S", rate=0.25),
        Denoiser("X", 3.0, 0.5), Denoiser("X", 8.0, 0.5), Denoiser("X", 64.0, 0.15), Denoiser("X", 64.0, 0.5),
    ]


@dataclass
class UL2Config(ObjectiveConfig):
    families: ClassVar[tuple[str, ...]] = ("encoder_decoder",)
    name: str = "ul2"
    denoisers: list[Denoiser] = field(default_factory=paper_denoisers)
    n_sentinels: int = 100

    def validate(self, where: str) -> None:
        check(where, "denoisers", len(self.denoisers) > 0, "needs at least one denoiser", self.denoisers)
        check(where, "n_sentinels", self.n_sentinels >= 1, "must be >= 1", self.n_sentinels)
        for i, d in enumerate(self.denoisers):
            key = f"denoisers[{i}]"
            check(where, f"{key}.rate", 0.0 < d.rate < 1.0, "must be in (0, 1)", d.rate)
            check(where, f"{key}.mean_span", d.mean_span >= 1.0, "must be >= 1", d.mean_span)
            check(where, f"{key}.weight", d.weight > 0, "must be > 0", d.weight)


class PrefixNoise:
    """S-denoiser: [S2S] + prefix + EOS -> suffix + EOS, the suffix `rate` of the piece (at least one
    token on each side)."""

    min_len = 2

    def __init__(self, rate: float, mode: int, eos: int):
        self.rate = rate
        self.mode = mode
        self.eos = eos

    def target(self, n: int) -> int:
        return min(max(round(self.rate * n), 1), n - 1)

    def lengths(self, n: int) -> tuple[int, int]:
        t = self.target(n)
        return n - t + 2, t + 1

    def __call__(self, piece: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        split = piece.size - self.target(piece.size)
        return np.concatenate(([self.mode], piece[:split], [self.eos])), np.append(piece[split:], self.eos)


@OBJECTIVES.register("ul2", config=UL2Config)
class UL2:
    short_rows = False

    def __init__(self, cfg: UL2Config, ctx: ObjectiveContext):
        special = ctx.special
        sentinels = special.require_sentinels(cfg.n_sentinels, "ul2")[: cfg.n_sentinels]
        modes = {kind: special.require(role, "ul2") for kind, role in (("R", "nlu"), ("S", "s2s"), ("X", "nlg"))}
        self.denoisers: list[PieceNoise] = [
            PrefixNoise(d.rate, modes["S"], special.eos)
            if d.kind == "S"
            else SpanNoise(d.rate, d.mean_span, sentinels, special.eos, mode=modes[d.kind])
            for d in cfg.denoisers
        ]
        weights = np.array([d.weight for d in cfg.denoisers], dtype=np.float64)
        self.cumulative = np.cumsum(weights / weights.sum())
        self.rows = Seq2SeqRows(special, ctx.seed, "ul2")

    @property
    def skipped(self) -> int:
        return self.rows.skipped

    def window(self, seq_len: int) -> int:
        raw = min(longest_piece(d.lengths, d.min_len, seq_len) for d in self.denoisers)
        if raw == 0:
            raise ValueError(f"ul2 needs longer inputs than seq_len {seq_len}")
        return raw

    def target_len(self, seq_len: int) -> int:
        raw = self.window(seq_len)
        return max(d.lengths(raw)[1] for d in self.denoisers)

    def choose(self, rng: np.random.Generator) -> PieceNoise:
        index = int(np.searchsorted(self.cumulative, rng.random(), side="right"))
        return self.denoisers[min(index, len(self.denoisers) - 1)]

    def __call__(self, batch: Batch) -> Example:
        seq_len = seq_len_for(self.window, batch.tokens.shape[1])
        return self.rows.build(batch, seq_len, self.target_len(seq_len), self.choose)
