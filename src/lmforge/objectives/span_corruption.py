"""O4: T5 span corruption, and the packing every encoder-decoder objective shares.

An encoder-decoder row is built per document piece: each piece of the raw row (a run of one doc id,
its closing EOS dropped) is noised on its own and becomes one packed example (one segment id in
both stacks), so noise never crosses a document boundary. Pieces too short for the noise are skipped
and counted; the piece that would overflow the row is cut to the longest prefix that fits, and the
rest of the row is dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
import torch

from lmforge.config import ObjectiveConfig, check
from lmforge.objectives.base import OBJECTIVES, AttentionLayout, Batch, Example, ObjectiveContext, row_rng
from lmforge.objectives.packing import document_spans, segment_positions
from lmforge.tokenizer.special_tokens import SpecialTokens

# ---------------------------------------------------------------- shared encoder-decoder packing


class PieceNoise(Protocol):
    """Turns one document piece into (encoder tokens, decoder labels), both ending with EOS."""

    min_len: int  # shorter pieces are skipped

    def lengths(self, n: int) -> tuple[int, int]:
        """(encoder, decoder) lengths an n-token piece becomes: exact, or a lower bound that the
        packer corrects by retrying on a shorter piece. Non-decreasing in n."""
        ...

    def __call__(self, piece: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]: ...


def seq_len_for(window: Callable[[int], int], width: int) -> int:
    """The largest seq_len whose window(seq_len) fits in `width` raw tokens: objectives receive rows
    of window(seq_len) tokens and recover seq_len from them (window must be strictly increasing; a
    window that raises ValueError for a seq_len too short for the objective counts as fitting)."""

    def fits(s: int) -> bool:
        try:
            return window(s) <= width
        except ValueError:
            return True

    lo, hi = 0, 2
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def longest_fit(lengths: Callable[[int], tuple[int, int]], lo: int, n: int, enc_room: int, dec_room: int) -> int:
    """The largest m in [lo, n] with lengths(m) within both rooms, or 0 (lengths is non-decreasing)."""

    def fits(m: int) -> bool:
        enc, dec = lengths(m)
        return enc <= enc_room and dec <= dec_room

    if n < lo or not fits(lo):
        return 0
    while lo < n:
        mid = (lo + n + 1) // 2
        lo, n = (mid, n) if fits(mid) else (lo, mid - 1)
    return lo


class Seq2SeqRows:
    """Packs noised pieces into fixed [B, seq_len] encoder and [B, target_len] decoder rows."""

    def __init__(self, special: SpecialTokens, seed: int, needed_by: str):
        self.eos = special.eos
        self.pad = special.require("pad", needed_by)
        self.seed = seed
        self.skipped = 0  # pieces too short for their noise

    def build(
        self, batch: Batch, seq_len: int, target_len: int, noise_of: Callable[[np.random.Generator], PieceNoise]
    ) -> Example:
        """`noise_of(rng)` picks the noise of a row (UL2 draws its denoiser there) from the row's rng."""
        B = len(batch.sample_ids)
        enc = np.full((B, seq_len), self.pad, dtype=np.int64)
        dec = np.full((B, target_len), self.pad, dtype=np.int64)
        enc_seg = np.zeros((B, seq_len), dtype=np.int64)
        dec_seg = np.zeros((B, target_len), dtype=np.int64)
        for r in range(B):
            rng = row_rng(self.seed, int(batch.sample_ids[r]))
            out = (enc[r], enc_seg[r], dec[r], dec_seg[r])
            self._fill_row(batch.tokens[r], batch.doc_ids[r], noise_of(rng), rng, out)
        return self._example(enc, enc_seg, dec, dec_seg)

    def _fill_row(
        self,
        tokens: np.ndarray,
        doc_ids: np.ndarray,
        noise: PieceNoise,
        rng: np.random.Generator,
        out: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    ) -> None:
        enc, enc_seg, dec, dec_seg = out
        e = d = 0
        segment = 0
        for a, b in document_spans(doc_ids):
            piece = tokens[a:b]
            if piece[-1] == self.eos:  # the document's own EOS; every example gets a fresh one
                piece = piece[:-1]
            if piece.size < noise.min_len:
                self.skipped += piece.size > 0  # an empty piece (a row opening on an EOS) loses nothing
                continue
            n = longest_fit(noise.lengths, noise.min_len, piece.size, enc.size - e, dec.size - d)
            while n >= noise.min_len:
                inp, tgt = noise(piece[:n], rng)
                over = max(inp.size - (enc.size - e), tgt.size - (dec.size - d))
                if over <= 0:
                    break
                n -= over  # an estimate was short (e.g. BART's inserted masks): retry a shorter prefix
            if n < noise.min_len:
                return  # the row is full
            segment += 1
            enc[e : e + inp.size], enc_seg[e : e + inp.size] = inp, segment
            dec[d : d + tgt.size], dec_seg[d : d + tgt.size] = tgt, segment
            e, d = e + inp.size, d + tgt.size

    def _example(self, enc: np.ndarray, enc_seg: np.ndarray, dec: np.ndarray, dec_seg: np.ndarray) -> Example:
        # Decoder input = [pad] + labels[:-1] inside each segment (T5's start token is pad).
        dec_in = np.full_like(dec, self.pad)
        dec_in[:, 1:] = dec[:, :-1]
        starts = np.ones_like(dec_seg, dtype=bool)
        starts[:, 1:] = dec_seg[:, 1:] != dec_seg[:, :-1]
        dec_in[starts | (dec_seg == 0)] = self.pad
        t = torch.from_numpy
        return Example(
            input_ids=t(enc),
            labels=t(dec),
            loss_mask=t((dec_seg > 0).astype(np.float32)),
            layout=AttentionLayout(causal=False, segment_ids=t(enc_seg)),
            position_ids=t(segment_positions(enc_seg)),
            decoder_input_ids=t(dec_in),
            decoder_layout=AttentionLayout(causal=True, segment_ids=t(dec_seg)),
            decoder_position_ids=t(segment_positions(dec_seg)),
        )


# ---------------------------------------------------------------- T5 span corruption


def noise_counts(n: int, density: float, mean_span: float, max_spans: int | None = None) -> tuple[int, int]:
    """(noise tokens, noise spans) of an n-token piece, as T5's random_spans_noise_mask counts them.
    Spans are capped by the sentinels available and by the non-noise tokens that separate them."""
    noise = min(max(round(n * density), 1), n - 1)
    spans = min(max(round(noise / mean_span), 1), n - noise)
    return noise, spans if max_spans is None else min(spans, max_spans)


def corrupted_lengths(n: int, density: float, mean_span: float, max_spans: int | None = None) -> tuple[int, int]:
    """(inputs, targets) lengths, EOS included: inputs keep the non-noise tokens plus one sentinel
    per span; targets hold one sentinel per span plus the noise tokens."""
    noise, spans = noise_counts(n, density, mean_span, max_spans)
    return n - noise + spans + 1, noise + spans + 1


def longest_piece(lengths: Callable[[int], tuple[int, int]], lo: int, inputs_length: int) -> int:
    """The longest piece (>= lo tokens) whose encoder side fits in `inputs_length`, or 0. The
    encoder side must grow without bound with the piece."""
    hi = max(lo, 1)
    while lengths(hi)[0] <= inputs_length:
        hi *= 2
    return longest_fit(lambda m: (lengths(m)[0], 0), lo, hi, inputs_length, 0)


def t5_lengths(
    inputs_length: int, density: float = 0.15, mean_span: float = 3.0, max_spans: int | None = None
) -> tuple[int, int]:
    """(raw tokens, targets length) so a raw row of that many tokens corrupts into exactly
    `inputs_length` input tokens: the longest raw length whose inputs still fit."""

    def lengths(m: int) -> tuple[int, int]:
        return corrupted_lengths(m, density, mean_span, max_spans)

    n = longest_piece(lengths, 2, inputs_length)
    if n == 0:
        raise ValueError(f"inputs of {inputs_length} tokens are too short for span corruption (needs >= 3)")
    return n, lengths(n)[1]


def random_composition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`parts` positive integers summing to `total`, uniform over all such compositions."""
    cuts = np.sort(rng.choice(total - 1, parts - 1, replace=False)) + 1
    return np.diff(np.concatenate(([0], cuts, [total])))


class SpanNoise:
    """T5's noise on one piece: spans of noise with uniform random lengths, alternating with non-noise
    runs, starting with non-noise; each noise span becomes one sentinel in the inputs, and the targets
    list each sentinel followed by the tokens it hides. `mode` (UL2) is prepended to the inputs."""

    min_len = 2

    def __init__(
        self, density: float, mean_span: float, sentinels: tuple[int, ...], eos: int, mode: int | None = None
    ):
        self.density = density
        self.mean_span = mean_span
        self.sentinels = np.asarray(sentinels, dtype=np.int64)
        self.eos = eos
        self.head = np.asarray([] if mode is None else [mode], dtype=np.int64)

    def lengths(self, n: int) -> tuple[int, int]:
        enc, dec = corrupted_lengths(n, self.density, self.mean_span, self.sentinels.size)
        return enc + self.head.size, dec

    def noise_mask(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Bool [n]: which tokens are noise (T5's random_spans_noise_mask)."""
        noise, spans = noise_counts(n, self.density, self.mean_span, self.sentinels.size)
        runs = np.stack([random_composition(n - noise, spans, rng), random_composition(noise, spans, rng)], axis=1)
        return np.repeat(np.tile([False, True], spans), runs.ravel())

    def __call__(self, piece: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        is_noise = self.noise_mask(piece.size, rng)
        before = np.concatenate(([False], is_noise[:-1]))
        first_noise = is_noise & ~before
        first_kept = ~is_noise & (before | (np.arange(piece.size) == 0))
        # The k-th noise span and the k-th non-noise run both map to <extra_id_k>.
        sentinel = self.sentinels[np.cumsum(first_kept) - 1]
        inputs = np.where(first_noise, sentinel, piece)[~is_noise | first_noise]
        targets = np.where(first_kept, sentinel, piece)[is_noise | first_kept]
        eos = [self.eos]
        return np.concatenate((self.head, inputs, eos)), np.concatenate((targets, eos))


@dataclass
class SpanCorruptionConfig(ObjectiveConfig):
    """T5 span corruption (defaults of T5: 15% noise in spans of mean 3, 100 sentinels)."""

    families: ClassVar[tuple[str, ...]] = ("encoder_decoder",)
    name: str = "span_corruption"
    noise_density: float = 0.15
    mean_span: float = 3.0
    n_sentinels: int = 100

    def validate(self, where: str) -> None:
        check(where, "noise_density", 0.0 < self.noise_density < 1.0, "must be in (0, 1)", self.noise_density)
        check(where, "mean_span", self.mean_span >= 1.0, "must be >= 1", self.mean_span)
        check(where, "n_sentinels", self.n_sentinels >= 1, "must be >= 1", self.n_sentinels)


@OBJECTIVES.register("span_corruption", config=SpanCorruptionConfig)
class SpanCorruption:
    """Inputs of seq_len tokens from window(seq_len) raw tokens; targets of the length T5 computes
    for that window. More spans than sentinels (seq_len above ~1900 at the defaults) are merged
    into n_sentinels spans rather than reusing ids."""

    short_rows = False

    def __init__(self, cfg: SpanCorruptionConfig, ctx: ObjectiveContext):
        self.cfg = cfg
        sentinels = ctx.special.require_sentinels(cfg.n_sentinels, "span_corruption")[: cfg.n_sentinels]
        self.noise = SpanNoise(cfg.noise_density, cfg.mean_span, sentinels, ctx.special.eos)
        self.rows = Seq2SeqRows(ctx.special, ctx.seed, "span_corruption")

    @property
    def skipped(self) -> int:
        return self.rows.skipped

    def lengths(self, seq_len: int) -> tuple[int, int]:
        return t5_lengths(seq_len, self.cfg.noise_density, self.cfg.mean_span, self.cfg.n_sentinels)

    def window(self, seq_len: int) -> int:
        return self.lengths(seq_len)[0]

    def __call__(self, batch: Batch) -> Example:
        seq_len = seq_len_for(self.window, batch.tokens.shape[1])
        return self.rows.build(batch, seq_len, self.lengths(seq_len)[1], lambda rng: self.noise)
