"""Gopher's quality and repetition rules (Rae et al. 2021, MassiveText; /work/shared/DATA_RULES.md).

Both rules count `textstats.tokens`: words and punctuation marks as NLTK's Treebank tokenizer splits
them, which is what the reference implementation (datatrove's Gopher filters) counts, so English
decisions match it. Defaults are the published thresholds; each is a constructor option.

How each statistic is defined for Chinese (a document whose letters are at least half CJK,
`textstats.is_chinese`; its tokens are jieba words and punctuation marks):
- word counts and every ratio whose denominator is "words" (the 50..100 000 length range, `#` and
  ellipsis per word, alphabetic share) count one unit per Chinese character, one per other word,
  one per punctuation mark (`textstats.units`), so a 50-word floor is 50 characters;
- mean word length is over jieba words in characters and is checked against its own range
  (`zh_min_avg_word_length`..`zh_max_avg_word_length`, default 1.2..4): edited Chinese averages about
  two characters a word, far below the English floor of 3;
- stop words are jieba words; the default list adds ten Chinese function words (的, 了, 是, ...) to
  Gopher's eight English ones, and at least `min_stop_words` distinct ones must occur;
- "……" (the Chinese ellipsis) counts as one ellipsis, like "..." and "…"; "•", "·", "●", "■", "◆"
  and "-" start bullet lines;
- repetition n-grams are over jieba words, and an n-gram's length is its characters without the
  joining spaces English n-grams count (Chinese is written without them); lines and paragraphs are
  the same in every language.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from itertools import filterfalse
from typing import Any, NamedTuple

import regex

from lmforge.data import textstats
from lmforge.data.document import Document
from lmforge.data.filters.base import Filter, OptionError, check_number, register_rule

DEFAULT_STOP_WORDS = (
    "the", "be", "to", "of", "and", "that", "have", "with",
    "的", "了", "是", "在", "和", "有", "也", "就", "都", "与",
)
_BULLET_LINE = re.compile(r"^\s*[•\-·●■◆]")
_ELLIPSIS_LINE = re.compile(r"(?:\.\.\.|…)\s*$")


@register_rule("gopher_quality")
class GopherQuality(Filter):
    """Drops documents outside Gopher's length, word-length, symbol, bullet, ellipsis, alphabetic and
    stop-word bounds. A bound set to None is not checked."""

    def __init__(
        self,
        min_words: int | None = 50,
        max_words: int | None = 100_000,
        min_avg_word_length: float | None = 3,
        max_avg_word_length: float | None = 10,
        zh_min_avg_word_length: float | None = 1.2,
        zh_max_avg_word_length: float | None = 4,
        max_symbol_word_ratio: float | None = 0.1,
        max_bullet_lines_ratio: float | None = 0.9,
        max_ellipsis_lines_ratio: float | None = 0.3,
        min_alpha_words_ratio: float | None = 0.8,
        min_stop_words: int | None = 2,
        stop_words: list[str] | None = None,
    ):
        self.min_words = _opt("min_words", min_words, integer=True)
        self.max_words = _opt("max_words", max_words, integer=True)
        self.word_length = {
            False: (_opt("min_avg_word_length", min_avg_word_length), _opt("max_avg_word_length", max_avg_word_length)),
            True: (
                _opt("zh_min_avg_word_length", zh_min_avg_word_length),
                _opt("zh_max_avg_word_length", zh_max_avg_word_length),
            ),
        }
        self.max_symbol_word_ratio = _opt("max_symbol_word_ratio", max_symbol_word_ratio)
        self.max_bullet_lines_ratio = _opt("max_bullet_lines_ratio", max_bullet_lines_ratio)
        self.max_ellipsis_lines_ratio = _opt("max_ellipsis_lines_ratio", max_ellipsis_lines_ratio)
        self.min_alpha_words_ratio = _opt("min_alpha_words_ratio", min_alpha_words_ratio)
        self.min_stop_words = _opt("min_stop_words", min_stop_words, integer=True)
        words = list(DEFAULT_STOP_WORDS) if stop_words is None else stop_words
        if not isinstance(words, list) or not all(isinstance(w, str) and w for w in words):
            raise OptionError("stop_words", f"expected a list of non-empty strings, got {stop_words!r}")
        self.stop_words = frozenset(words)

    def keep(self, doc: Document) -> tuple[bool, str]:
        c = _Counts.of(doc.text)
        for check in (self._length, self._word_length, self._symbols, self._lines, self._alpha, self._stop_words):
            reason = check(doc.text, c)
            if reason:
                return False, reason
        return True, ""

    def _length(self, text: str, c: _Counts) -> str:
        if self.min_words is not None and c.n_words < self.min_words:
            return f"gopher_words={c.n_words}<{self.min_words}"
        if self.max_words is not None and c.n_words > self.max_words:
            return f"gopher_words={c.n_words}>{self.max_words}"
        return ""

    def _word_length(self, text: str, c: _Counts) -> str:
        low, high = self.word_length[c.chinese]
        mean = c.mean_word_length
        if low is not None and mean < low:
            return f"gopher_mean_word_length={mean:.2f}<{low:g}"
        if high is not None and mean > high:
            return f"gopher_mean_word_length={mean:.2f}>{high:g}"
        return ""

    def _symbols(self, text: str, c: _Counts) -> str:
        limit = self.max_symbol_word_ratio
        if limit is None:
            return ""
        for name, count in (("hash", text.count("#")), ("ellipsis", _ellipses(text))):
            ratio = count / c.n_units if c.n_units else float(count > 0)
            if ratio > limit:
                return f"gopher_{name}_ratio={ratio:.3f}>{limit:g}"
        return ""

    def _lines(self, text: str, c: _Counts) -> str:
        lines = text.splitlines() or [""]
        for name, limit, pattern in (
            ("bullet", self.max_bullet_lines_ratio, _BULLET_LINE),
            ("ellipsis", self.max_ellipsis_lines_ratio, _ELLIPSIS_LINE),
        ):
            if limit is None:
                continue
            hits = len(list(filter(pattern.search, lines)))
            if hits / len(lines) > limit:
                return f"gopher_{name}_lines={hits / len(lines):.2f}>{limit:g}"
        return ""

    def _alpha(self, text: str, c: _Counts) -> str:
        if self.min_alpha_words_ratio is None:
            return ""
        ratio = c.n_alpha / c.n_units if c.n_units else 0.0
        if ratio < self.min_alpha_words_ratio:
            return f"gopher_alpha_words={ratio:.2f}<{self.min_alpha_words_ratio:g}"
        return ""

    def _stop_words(self, text: str, c: _Counts) -> str:
        if self.min_stop_words is None:
            return ""
        n = len(self.stop_words.intersection(c.tokens))
        return f"gopher_stop_words={n}<{self.min_stop_words}" if n < self.min_stop_words else ""


class _Counts(NamedTuple):
    """One document's tokens and the counts every quality check divides by."""

    tokens: tuple[str, ...]
    n_words: int  # tokens with a letter or digit, in length units (one per Chinese character)
    mean_word_length: float  # characters per word token
    n_units: int  # all tokens, in length units
    n_alpha: int  # word tokens with a letter, in length units
    chinese: bool

    @classmethod
    def of(cls, text: str) -> _Counts:
        toks = textstats.tokens(text)
        if textstats.is_chinese(text):
            words = textstats.word_tokens(toks)
            n_words = sum(map(textstats.units, words))
            n_alpha = sum(map(textstats.units, filter(_ALPHA.search, words)))
            mean = sum(map(len, words)) / len(words) if words else 0.0
            return cls(toks, n_words, mean, sum(map(textstats.units, toks)), n_alpha, True)
        return cls(toks, *_english_counts(toks), False)


def _english_counts(toks: tuple[str, ...]) -> tuple[int, float, int, int]:
    """(words, mean word length, tokens, alphabetic words) with no Python code per token: most tokens
    are plain letter/digit runs (str.isalnum), and only the rest go through the regexes."""
    rest = list(filterfalse(str.isalnum, toks))
    rest_words = textstats.word_tokens(rest)
    n_plain = len(toks) - len(rest)
    n_words = n_plain + len(rest_words)
    chars = sum(map(len, toks)) - sum(map(len, rest)) + sum(map(len, rest_words))
    # A plain token without a letter is all digits; no other token is str.isnumeric.
    n_alpha = n_plain - sum(map(str.isnumeric, toks)) + len(list(filter(_ALPHA.search, rest_words)))
    return n_words, chars / n_words if n_words else 0.0, len(toks), n_alpha


_ALPHA = regex.compile(r"\p{L}")  # str.isalpha's letters, as the reference tests; "²" is not one
_PARAGRAPH_BREAK = re.compile(r"\n{2,}")
_LINE_BREAK = re.compile(r"\n+")
TOP_N_GRAMS = ((2, 0.20), (3, 0.18), (4, 0.16))
DUP_N_GRAMS = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))


@register_rule("gopher_repetition")
class GopherRepetition(Filter):
    """Drops documents whose lines, paragraphs or word n-grams repeat beyond Gopher's bounds.

    `top_n_grams` / `dup_n_grams` are lists of [n, max_char_fraction]; an empty list turns that rule off.
    """

    def __init__(
        self,
        dup_line_frac: float | None = 0.30,
        dup_para_frac: float | None = 0.30,
        dup_line_char_frac: float | None = 0.20,
        dup_para_char_frac: float | None = 0.20,
        top_n_grams: Sequence[Sequence[float]] = TOP_N_GRAMS,
        dup_n_grams: Sequence[Sequence[float]] = DUP_N_GRAMS,
    ):
        self.dup_line_frac = _opt("dup_line_frac", dup_line_frac)
        self.dup_para_frac = _opt("dup_para_frac", dup_para_frac)
        self.dup_line_char_frac = _opt("dup_line_char_frac", dup_line_char_frac)
        self.dup_para_char_frac = _opt("dup_para_char_frac", dup_para_char_frac)
        self.top_n_grams = _n_gram_limits("top_n_grams", top_n_grams)
        # Ascending n: a document with no repeated n-gram has no repeated longer one either.
        self.dup_n_grams = tuple(sorted(_n_gram_limits("dup_n_grams", dup_n_grams)))

    def keep(self, doc: Document) -> tuple[bool, str]:
        text = doc.text
        if not text:
            return False, "empty"
        for unit, parts, frac, char_frac in (
            ("para", _PARAGRAPH_BREAK.split(text.strip()), self.dup_para_frac, self.dup_para_char_frac),
            ("line", _LINE_BREAK.split(text), self.dup_line_frac, self.dup_line_char_frac),
        ):
            n_dup, dup_chars = duplicates(parts)
            if frac is not None and n_dup / len(parts) > frac:
                return False, f"gopher_dup_{unit}s={n_dup / len(parts):.2f}>{frac:g}"
            if char_frac is not None and dup_chars / len(text) > char_frac:
                return False, f"gopher_dup_{unit}_chars={dup_chars / len(text):.2f}>{char_frac:g}"
        return self._n_grams(text)

    def _n_grams(self, text: str) -> tuple[bool, str]:
        toks = textstats.tokens(text)
        sep = 0 if textstats.is_chinese(text) else 1
        for n, limit in self.top_n_grams:
            frac = top_n_gram_chars(toks, n, sep) / len(text)
            if frac > limit:
                return False, f"gopher_top_{n}_gram={frac:.2f}>{limit:g}"
        longest = sorted(map(len, toks), reverse=True)
        for n, limit in self.dup_n_grams:
            grams = n_grams(toks, n)
            counts = Counter(grams)
            n_repeats = len(grams) - len(counts)
            if n_repeats == 0:
                break
            # Each repeat adds at most the n longest tokens' characters: when even that stays under the
            # limit, the exact scan cannot fail.
            if n_repeats * sum(longest[:n]) <= limit * len(text):
                continue
            frac = duplicated_n_gram_chars(grams, counts, n) / len(text)
            if frac > limit:
                return False, f"gopher_dup_{n}_grams={frac:.2f}>{limit:g}"
        return True, ""


def duplicates(parts: list[str]) -> tuple[int, int]:
    """(number of parts equal to an earlier part, their characters)."""
    counts = Counter(parts)
    if len(counts) == len(parts):
        return 0, 0
    return len(parts) - len(counts), sum(len(p) * (c - 1) for p, c in counts.items() if c > 1)


def _ellipses(text: str) -> int:
    # The Chinese ellipsis "……" is written as two "…" but is one mark.
    return text.count("...") + text.count("…") - text.count("……")


def n_grams(toks: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return list(zip(*(toks[i:] for i in range(n)), strict=False))


def top_n_gram_chars(toks: Sequence[str], n: int, sep: int) -> int:
    """Characters covered by the most frequent n-gram (the earliest among ties): its length (words plus
    `sep` per joining space) times its count."""
    if len(toks) < n:
        return 0
    gram, count = Counter(n_grams(toks, n)).most_common(1)[0]  # the earliest among ties, as the reference
    return (sum(map(len, gram)) + sep * (n - 1)) * count


def duplicated_n_gram_chars(grams: list[tuple[str, ...]], counts: Counter[tuple[str, ...]], n: int) -> int:
    """Characters of n-grams that repeat an earlier n-gram, scanning left to right and jumping past each
    repeat (so overlapping repeats are not double counted), as Gopher's reference does. `counts` is
    `Counter(grams)`.

    Only positions whose n-gram occurs twice or more can ever be looked up, so the scan visits just
    those; a position inside the jump after a repeat is skipped exactly as the full scan would."""
    seen: set[tuple[str, ...]] = set()
    total, skip_until = 0, 0
    for i, gram in enumerate(grams):
        if counts[gram] < 2 or i < skip_until:
            continue
        if gram in seen:
            total += sum(map(len, gram))
            skip_until = i + n
        else:
            seen.add(gram)
    return total


def _opt(key: str, value: Any, *, integer: bool = False) -> Any:
    """A threshold that may be None (rule off)."""
    return None if value is None else check_number(key, value, integer=integer)


def _n_gram_limits(key: str, value: Any) -> tuple[tuple[int, float], ...]:
    if not isinstance(value, list | tuple):
        raise OptionError(key, f"expected a list of [n, max_fraction] pairs, got {value!r}")
    out = []
    for pair in value:
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise OptionError(key, f"expected [n, max_fraction], got {pair!r}")
        n = check_number(f"{key}.n", pair[0], integer=True, minimum=1)
        out.append((n, check_number(f"{key}.max_fraction", pair[1])))
    return tuple(out)
