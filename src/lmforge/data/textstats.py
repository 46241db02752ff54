"""CJK-aware text statistics shared by the filters.

Chinese and Japanese do not put spaces between words, so a whitespace tokenizer would call a whole
Chinese paragraph one word. Counting each ideograph (and each kana or hangul syllable) as a word
puts "25 words" on the same scale in every language, which is what length and ratio rules need.
"""

from __future__ import annotations

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
