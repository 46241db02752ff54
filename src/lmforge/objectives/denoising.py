"""O5: BART noising (BART §2.2; fairseq's denoising dataset): text infilling, sentence permutation,
token deletion and document rotation. The decoder reconstructs the original piece.

Word starts come from the token strings of the byte-level vocabulary: a token beginning with a space
or newline, a token after a newline or a special token, and every CJK character (Chinese has no
spaces, so each character is a word). Unlike fairseq, infilling spans never overlap (fairseq draws
span starts independently and lets later spans swallow earlier ones), so exactly the budget of words
is masked and every span keeps its own mask token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from lmforge.config import ObjectiveConfig, check
from lmforge.objectives.base import OBJECTIVES, Batch, Example, ObjectiveContext
from lmforge.objectives.span_corruption import Seq2SeqRows, seq_len_for

FULL_STOPS = (".", "!", "?", "。", "！", "？")
# Ideographs, kana, CJK punctuation and full-width forms: each character is a word of its own.
CJK_RANGES = (
    (0x2E80, 0x2FDF), (0x3000, 0x30FF), (0x31F0, 0x31FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF),
    (0xF900, 0xFAFF), (0xFF00, 0xFFEF), (0x20000, 0x2FA1F),
)


def byte_decoder() -> dict[str, int]:
    """Byte-level BPE's character -> byte map (printable bytes stand for themselves, the others
    are shifted to 256 + k in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in table.values()]
    table.update({chr(256 + k): b for k, b in enumerate(others)})
    return table


def token_bytes(token: str, table: dict[str, int]) -> bytes:
    """The bytes a token string stands for; a string outside the byte alphabet (a SentencePiece
    vocabulary, where '▁' is the space) is read as text."""
    if all(c in table for c in token):
        return bytes(table[c] for c in token)
    return token.replace("▁", " ").encode("utf-8")


def starts_cjk(data: bytes) -> bool:
    """True if `data` begins with a CJK character; a token holding only the first bytes of a
    character counts when its lead byte opens U+3000..U+9FFF."""
    size = 3 if data[:1] and 0xE0 <= data[0] < 0xF0 else 4 if data[:1] and 0xF0 <= data[0] < 0xF8 else 0
    if not size:
        return False
    try:
        point = ord(data[:size].decode("utf-8"))
    except UnicodeDecodeError:  # the token holds only part of the character
        return 0xE3 <= data[0] <= 0xE9
    return any(lo <= point <= hi for lo, hi in CJK_RANGES)


class TokenClasses:
    """Per vocabulary id: does the token start a word, does the token after it start one, does it
    end a sentence."""

    def __init__(self, strings: list[str], special_ids: frozenset[int]):
        table = byte_decoder()
        data = [token_bytes(s, table) for s in strings]
        special = np.zeros(len(strings), dtype=bool)
        special[[i for i in special_ids if i < len(strings)]] = True
        self.start = special | np.array([d[:1] in (b" ", b"\n") or starts_cjk(d) for d in data], dtype=bool)
        self.breaks = special | np.array([d.endswith(b"\n") for d in data], dtype=bool)
        self.full_stop = np.array([d.decode("utf-8", "ignore").endswith(FULL_STOPS) for d in data], dtype=bool)
        self.full_stop &= ~special

    def word_starts(self, piece: np.ndarray) -> np.ndarray:
        starts = self.start[piece]
        starts[1:] |= self.breaks[piece[:-1]]
        starts[0] = True
        return starts


@dataclass
class BartNoisingConfig(ObjectiveConfig):
    """BART's final noising: 30% of words masked in Poisson(3) spans, sentences shuffled.
    `replace_length`: 1 = one mask per span, -1 = one mask per masked token; `delete_tokens` removes
    the masked tokens instead (fairseq's replace_length 0)."""

    families: ClassVar[tuple[str, ...]] = ("encoder_decoder",)
    name: str = "bart"
    mask_ratio: float = 0.3
    poisson_lambda: float = 3.0
    permute_sentences: bool = True
    delete_tokens: bool = False
    rotate_document: bool = False
    replace_length: int = 1

    def validate(self, where: str) -> None:
        check(where, "mask_ratio", 0.0 <= self.mask_ratio <= 1.0, "must be in [0, 1]", self.mask_ratio)
        check(where, "poisson_lambda", self.poisson_lambda > 0, "must be > 0", self.poisson_lambda)
        check(where, "replace_length", self.replace_length in (1, -1),
              "must be 1 (one mask per span) or -1 (one per token); delete_tokens=true deletes", self.replace_length)


class BartNoise:
    """One piece -> (noised piece + EOS, original piece + EOS)."""

    min_len = 1

    def __init__(self, cfg: BartNoisingConfig, classes: TokenClasses, mask: int, eos: int):
        self.cfg = cfg
        self.classes = classes
        self.mask = mask
        self.eos = eos

    def lengths(self, n: int) -> tuple[int, int]:
        return n + 1, n + 1  # inserted masks can lengthen the input: the packer retries then

    def __call__(self, piece: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        tokens, starts = piece, self.classes.word_starts(piece)
        if self.cfg.permute_sentences:
            tokens, starts = self.permute(tokens, starts, rng)
        tokens = self.infill(tokens, starts, rng)
        if self.cfg.rotate_document and tokens.size > 1:
            # fairseq's offset in [1, len-2] with BOS/EOS kept in place = a shift in [0, n-1] here
            tokens = np.roll(tokens, -int(rng.integers(tokens.size)))
        eos = [self.eos]
        return np.concatenate((tokens, eos)), np.concatenate((piece, eos))

    def permute(
        self, tokens: np.ndarray, starts: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Shuffle the sentences (cut after each run of full-stop tokens); word starts move along,
        and a sentence's first token starts a word wherever it lands."""
        stop = self.classes.full_stop[tokens]
        cuts = np.flatnonzero(stop[:-1] & ~stop[1:]) + 1
        starts = starts.copy()
        starts[cuts] = True
        order = rng.permutation(cuts.size + 1)
        pieces, flags = np.split(tokens, cuts), np.split(starts, cuts)
        return np.concatenate([pieces[i] for i in order]), np.concatenate([flags[i] for i in order])

    def span_lengths(self, budget: int, rng: np.random.Generator) -> np.ndarray:
        """Poisson span lengths (in words) drawn until they cover the budget, the last one cut so
        they sum to it exactly; zeros stay (each inserts a mask)."""
        draws = rng.poisson(self.cfg.poisson_lambda, budget)
        while draws.sum() < budget:
            draws = np.concatenate((draws, rng.poisson(self.cfg.poisson_lambda, budget)))
        total = np.cumsum(draws)
        last = int(np.searchsorted(total, budget))  # first span reaching the budget
        draws = draws[: last + 1]
        draws[last] = budget - (total[last - 1] if last else 0)
        return draws

    def infill(self, tokens: np.ndarray, starts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        first_token = np.flatnonzero(starts)  # first token of each word
        n_words = first_token.size
        budget = math.ceil(self.cfg.mask_ratio * n_words)
        if budget == 0:
            return tokens
        lengths = rng.permutation(self.span_lengths(budget, rng))
        # Uniform non-overlapping placement: choose which of (free words + spans) slots hold spans.
        m = lengths.size
        slots = np.sort(rng.choice(n_words - budget + m, m, replace=False))
        word0 = slots - np.arange(m) + np.concatenate(([0], np.cumsum(lengths)[:-1]))
        edges = np.zeros(n_words + 1, dtype=np.int64)
        np.add.at(edges, word0, 1)
        np.add.at(edges, word0 + lengths, -1)
        masked = (np.cumsum(edges)[:-1] > 0)[np.cumsum(starts) - 1]
        spans = lengths > 0
        if self.cfg.delete_tokens:
            keep = ~masked
        elif self.cfg.replace_length == 1:
            keep = ~masked
            keep[first_token[word0[spans]]] = True
        else:
            keep = np.ones_like(masked)
        out = np.where(masked, self.mask, tokens)[keep]
        if self.cfg.delete_tokens:
            return out
        # A zero-length span inserts one mask before its word (or at the end).
        at = np.append(first_token, tokens.size)[word0[~spans]]
        return np.insert(out, np.concatenate(([0], np.cumsum(keep)))[at], self.mask)


@OBJECTIVES.register("bart", config=BartNoisingConfig)
class BartDenoising:
    """Inputs of seq_len tokens (noised pieces + EOS); targets of seq_len (original pieces + EOS)
    from window(seq_len) = seq_len - 1 raw tokens."""

    short_rows = False

    def __init__(self, cfg: BartNoisingConfig, ctx: ObjectiveContext):
        mask = ctx.special.require("mask", "bart")
        classes = TokenClasses(ctx.token_strings(), ctx.special.ids())
        self.noise = BartNoise(cfg, classes, mask, ctx.special.eos)
        self.rows = Seq2SeqRows(ctx.special, ctx.seed, "bart")

    @property
    def skipped(self) -> int:
        return self.rows.skipped

    def window(self, seq_len: int) -> int:
        if seq_len < 2:
            raise ValueError(f"bart needs inputs of at least 2 tokens, got seq_len {seq_len}")
        return seq_len - 1

    def __call__(self, batch: Batch) -> Example:
        seq_len = seq_len_for(self.window, batch.tokens.shape[1])
        return self.rows.build(batch, seq_len, seq_len, lambda rng: self.noise)
