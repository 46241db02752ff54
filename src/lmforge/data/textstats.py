"""CJK-aware text statistics shared by the filters.

Chinese and Japanese do not put spaces between words, so a whitespace tokenizer would call a whole
Chinese paragraph one word. Counting each ideograph (and each kana or hangul syllable) as a word
puts "25 words" on the same scale in every language, which is what length and ratio rules need.

The published rule sets (Gopher, C4, FineWeb) also need real words, for mean word length, n-grams
and stop words: `tokens` splits English as their reference implementation's NLTK tokenizer does and
Chinese into jieba words (loaded lazily, on the first Chinese document).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import regex

# Scripts written without word separators (hangul is included so Korean is counted per syllable,
# matching the other CJK scripts rather than relying on its spaces).
_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}"
# V1 enables set subtraction: a letter/digit run stops at the first CJK character. \p{M} keeps
# combining marks (Devanagari vowel signs, accents) inside their word.
_WORD = regex.compile(rf"(?V1)[{_CJK}]|[[\p{{L}}\p{{N}}\p{{M}}]--[{_CJK}]]+")
# Latin terminators need following whitespace so "3.14" and "json.loads" stay whole; CJK
# terminators are never followed by a space.
_SENTENCE_END = regex.compile(r"(?<=[.!?])\s+|(?<=[。！？；])")
_CJK_CHAR = regex.compile(rf"[{_CJK}]")


def words(text: str) -> list[str]:
    """Letter/digit runs, with every CJK character as a word of its own."""
    return _WORD.findall(text)


def sentences(text: str) -> list[str]:
    """Non-empty stripped sentences, split after . ! ? (before whitespace) and after 。！？；."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def has_cjk(text: str) -> bool:
    return _CJK_CHAR.search(text) is not None


# ---- Tokens for the published rule sets (Gopher, C4, FineWeb) ------------------------------------
#
# The reference implementations count NLTK (Treebank) tokens: words and every punctuation mark as
# a token of its own ("don't" -> "do", "n't"; "os.path" stays whole; a sentence-final "." splits
# off). `tokens` reproduces that closely with one regex, so our decisions match theirs on English.
# Chinese has no spaces, so a Chinese document is segmented into words by jieba instead.

# Stdlib `re` runs this pattern about 3x faster than `regex`, so the CJK scripts are spelled as ranges
# (kana, CJK extension A, unified ideographs, hangul, compatibility ideographs, the supplementary planes).
_CJK_RANGES = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003134f"
# Treebank splits off only these marks (and runs of backticks); =, +, /, ~, | and the like stay inside
# a token ("x=1").
_SPLIT = r"""\s.,;:@#$%&?!()\[\]{}<>"*`«“‘„»”’\u2012-\u2015"""
_CONTRACTION = r"(?i:n't|'(?:s|m|d|re|ve|ll))(?!\w)"
# Token characters: anything but whitespace, a split mark or CJK, except where a contraction ("n't"),
# "--" or a quote closing a word begins; "." only inside a token ("os.path", "3.14", not a sentence
# end); "," or ":" only before a digit ("1,000", "10:30"). A token does not start with a quote before
# a letter (Treebank splits that opening quote off). The plain character class comes first because
# it matches almost every character; the lookaheads run only on n, -, ', ".", "," and ":".
_GLUE = (
    rf"(?!'\w)(?:[^{_SPLIT}{_CJK_RANGES}'nN\-]++|[nN](?!'[tT](?!\w))|-(?!-)"
    rf"|'(?!(?i:s|m|d|re|ve|ll)(?!\w)|[{_SPLIT}]|$)|\.(?=[^{_SPLIT}{_CJK_RANGES}])|[,:](?=\d))++"
)
# Most tokens are _GLUE, so it is tried first; "cannot" is two tokens, as in Treebank.
_TOKEN = re.compile(rf"(?i:can)(?=not\b)|{_GLUE}|\.\.\.|--|`+|{_CONTRACTION}|[{_CJK_RANGES}]|\S")
_CJK_FAST = re.compile(f"[{_CJK_RANGES}]")
_LETTER = regex.compile(r"\p{L}")
_HAS_WORD_CHAR = re.compile(r"[^\W_]")


@functools.lru_cache(maxsize=8)
def is_chinese(text: str) -> bool:
    """True when CJK characters are at least half of the letters: such text is segmented by jieba.
    An English page quoting one Chinese name stays on the English tokenizer. Cached like `tokens`."""
    if _CJK_FAST.search(text) is None:  # the common case, at `re` speed
        return False
    return 2 * len(_CJK_CHAR.findall(text)) >= len(_LETTER.findall(text))


@functools.cache
def _jieba() -> Any:
    """jieba, initialised once and quietly: it logs to stderr and writes its dictionary cache on first
    use, so the cache goes to a fixed per-user file under the temp dir instead of wherever it likes."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    cache_dir = Path(tempfile.gettempdir()) / f"lmforge-jieba-{os.getuid() if hasattr(os, 'getuid') else 0}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    jieba.dt.tmp_dir = str(cache_dir)
    jieba.dt.initialize()
    return jieba


def segment(text: str) -> list[str]:
    """jieba words of `text` (HMM off: dictionary words only, deterministic and faster), whitespace dropped."""
    return [t for t in _jieba().lcut(text, HMM=False) if not t.isspace()]


@functools.lru_cache(maxsize=8)
def tokens(text: str) -> tuple[str, ...]:
    """Words and punctuation marks in order, as the reference filters count them.

    English: the Treebank-like regex above. Chinese (`is_chinese`): jieba words and punctuation.
    Cached for the last few texts because a rule chain asks for the same document's tokens
    several times (the reference implementation caches the same way).
    """
    return tuple(segment(text)) if is_chinese(text) else tuple(_TOKEN.findall(text))


def word_tokens(toks: Iterable[str]) -> list[str]:
    """The tokens with a letter or digit; the rest are punctuation/symbol tokens."""
    return list(filter(_HAS_WORD_CHAR.search, toks))


def units(token: str) -> int:
    """How much a token counts toward length thresholds: one per CJK character, else one."""
    n = len(_CJK_CHAR.findall(token))
    return n if n else 1
