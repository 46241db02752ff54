"""FineWeb's extra quality rules (Penedo et al. 2024; /work/shared/DATA_RULES.md).

Over the non-empty lines of a document: at least `min_punct_line_ratio` of them end in terminal
punctuation, at most `max_short_line_ratio` are `short_line_length` characters or shorter, the
characters of lines that repeat an earlier line are at most `max_dup_line_char_ratio` of all
characters (newlines excluded), and newlines per word are at most `max_newline_word_ratio`.

Duplicate-line default: 0.1, the threshold the FineWeb write-up states. The code that built FineWeb
(datatrove's `FineWebQualityFilter`) uses 0.01, which drops a 2 KB page for one repeated 20-character
caption; pass `max_dup_line_char_ratio: 0.01` to reproduce the dataset exactly. The newline rule is
in that code only, not in the write-up; it is kept (0.3) because it is what removes link lists.

How each statistic is defined for Chinese:
- terminal punctuation adds ；and closing quotes after a terminator (。” 。」) to the reference's
  sentence-ending marks, which already include 。！？;
- line lengths are in characters, as in English;
- "words" are `textstats.tokens` in length units: one per Chinese character, one per other word or
  punctuation mark (the reference counts punctuation marks as words too).
"""

from __future__ import annotations

import re

from lmforge.data import textstats
from lmforge.data.document import Document
from lmforge.data.filters.base import Filter, check_number, register_rule
from lmforge.data.filters.gopher import duplicates

# Sentence-ending marks (Latin, CJK full- and half-width), optionally followed by closing quotes.
_PUNCT_END = re.compile(r"[.!?。！？；．｡][”’」』]*$")


@register_rule("fineweb")
class FineWeb(Filter):
    def __init__(
        self,
        min_punct_line_ratio: float = 0.12,
        max_short_line_ratio: float = 0.67,
        short_line_length: int = 30,
        max_dup_line_char_ratio: float = 0.1,
        max_newline_word_ratio: float = 0.3,
    ):
        self.min_punct_line_ratio = check_number("min_punct_line_ratio", min_punct_line_ratio)
        self.max_short_line_ratio = check_number("max_short_line_ratio", max_short_line_ratio)
        self.short_line_length = check_number("short_line_length", short_line_length, integer=True)
        self.max_dup_line_char_ratio = check_number("max_dup_line_char_ratio", max_dup_line_char_ratio)
        self.max_newline_word_ratio = check_number("max_newline_word_ratio", max_newline_word_ratio)

    def keep(self, doc: Document) -> tuple[bool, str]:
        text = doc.text
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            return False, "empty"
        ratio = sum(1 for line in lines if _PUNCT_END.search(line)) / len(lines)
        if ratio < self.min_punct_line_ratio:
            return False, f"fineweb_punct_lines={ratio:.2f}<{self.min_punct_line_ratio:g}"
        ratio = sum(1 for line in lines if len(line) <= self.short_line_length) / len(lines)
        if ratio > self.max_short_line_ratio:
            return False, f"fineweb_short_lines={ratio:.2f}>{self.max_short_line_ratio:g}"
        ratio = duplicates(lines)[1] / max(1, len(text) - text.count("\n"))
        if ratio > self.max_dup_line_char_ratio:
            return False, f"fineweb_dup_line_chars={ratio:.3f}>{self.max_dup_line_char_ratio:g}"
        return self._newlines(text)

    def _newlines(self, text: str) -> tuple[bool, str]:
        toks = textstats.tokens(text)
        n_words = sum(map(textstats.units, toks)) if textstats.is_chinese(text) else len(toks)
        ratio = text.count("\n") / n_words if n_words else float("inf")
        if ratio > self.max_newline_word_ratio:
            return False, f"fineweb_newlines_per_word={ratio:.2f}>{self.max_newline_word_ratio:g}"
        return True, ""
