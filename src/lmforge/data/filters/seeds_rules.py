"""Rules stated in the seed documents (SPEC D2; /work/shared/DATA_RULES.md "Rules stated in the seeds").

Every length and ratio goes through `textstats.words`, so Chinese is measured per character.
"""

from __future__ import annotations

import html
import math
import re
from collections import Counter
from dataclasses import replace
from typing import Any

from lmforge.data import textstats
from lmforge.data.document import Document
from lmforge.data.filters.base import Filter, OptionError, Transform, check_number, register_rule

# The seeds' English list, plus high-frequency Chinese function words so Chinese prose passes
# the same rule (SPEC D8).
DEFAULT_STOP_WORDS = (
    "the", "be", "to", "of", "and", "that", "have", "with",
    "的", "了", "是", "在", "和", "有", "我", "不", "这", "也",
)


@register_rule("min_words")
class MinWords(Filter):
    def __init__(self, min_words: int = 25):
        self.min_words = check_number("min_words", min_words, integer=True)

    def keep(self, doc: Document) -> tuple[bool, str]:
        n = len(textstats.words(doc.text))
        return (True, "") if n >= self.min_words else (False, f"words={n}<{self.min_words}")


@register_rule("symbol_ratio")
class SymbolRatio(Filter):
    """Gopher-style: ('#' characters + ellipses) per word; above `max_ratio` drops."""

    def __init__(self, max_ratio: float = 0.1):
        self.max_ratio = check_number("max_ratio", max_ratio)

    def keep(self, doc: Document) -> tuple[bool, str]:
        text = doc.text
        n_symbols = text.count("#") + text.count("...") + text.count("…")
        n_words = len(textstats.words(text))
        if n_symbols == 0:
            return True, ""
        ratio = n_symbols / n_words if n_words else math.inf
        return (True, "") if ratio <= self.max_ratio else (False, f"symbol_ratio={ratio:.3f}>{self.max_ratio:g}")


@register_rule("stop_words")
class StopWords(Filter):
    """Natural prose contains function words; boilerplate, lists and spam often do not.

    Words without CJK characters match whole words case-insensitively ("theory" is not "the");
    CJK words match as substrings, since Chinese has no word boundaries to match on.
    """

    def __init__(self, words: list[str] | None = None, min_count: int = 1):
        words = list(DEFAULT_STOP_WORDS) if words is None else words
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w for w in words):
            raise OptionError("words", f"expected a non-empty list of strings, got {words!r}")
        self.min_count = check_number("min_count", min_count, integer=True)
        self.cjk = tuple(w for w in words if textstats.has_cjk(w))
        self.latin = frozenset(w.lower() for w in words if not textstats.has_cjk(w))

    def keep(self, doc: Document) -> tuple[bool, str]:
        n = sum(doc.text.count(w) for w in self.cjk)
        if n < self.min_count and self.latin:
            n += sum(1 for w in textstats.words(doc.text) if w.lower() in self.latin)
        return (True, "") if n >= self.min_count else (False, f"stop_words={n}<{self.min_count}")


@register_rule("max_repeats")
class MaxRepeats(Filter):
    """Drops a document in which one sentence or one word occurs more than its limit.

    A repeated sentence repeats all its words too, so the sentence limit only adds anything when it
    is the lower one (`max_sentence_repeats`, default: `max_repeats`); it is checked first because
    it names the boilerplate. Literal seed rule: in long natural text a function word ("the", "的")
    can pass 100 on its own, so raise `max_repeats` or restrict `sources` for long documents.
    """

    def __init__(self, max_repeats: int = 100, max_sentence_repeats: int | None = None):
        self.max_repeats = check_number("max_repeats", max_repeats, integer=True, minimum=1)
        if max_sentence_repeats is None:
            max_sentence_repeats = max_repeats
        self.max_sentence_repeats = check_number(
            "max_sentence_repeats", max_sentence_repeats, integer=True, minimum=1
        )

    def keep(self, doc: Document) -> tuple[bool, str]:
        for unit, items, limit in (
            ("sentence", textstats.sentences(doc.text), self.max_sentence_repeats),
            ("word", textstats.words(doc.text), self.max_repeats),
        ):
            if len(items) <= limit:
                continue
            item, n = Counter(items).most_common(1)[0]
            if n > limit:
                return False, f"{unit} {_clip(item)!r} x{n}>{limit}"
        return True, ""


def _clip(s: str, n: int = 40) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


# Elements whose content is not text at all, and comments: removed by a linear scan, not a lazy
# `<script>.*?</script>` regex, which rescans to the end of the page for every unclosed opening
# (quadratic: a 432 KB page of unclosed tags took 4.3 s). Unclosed, they run to the end, as in a browser.
_INVISIBLE_OPEN = re.compile(r"<(script|style|noscript|template)\b[^>]*>|<!--", re.IGNORECASE)
_CLOSE = {name: re.compile(rf"</{name}\s*>", re.IGNORECASE) for name in ("script", "style", "noscript", "template")}
# Block elements become line breaks so "<p>a</p><p>b</p>" does not fuse into "ab".
_BLOCK = re.compile(
    r"</?(p|div|br|hr|li|ul|ol|tr|td|th|table|h[1-6]|section|article|header|footer|blockquote|pre)\b[^>]*>",
    re.IGNORECASE,
)
# Only things shaped like tags, so prose such as "a < b and c > d" survives.
_TAG = re.compile(r"</?[A-Za-z][^<>]*>|<![A-Za-z][^<>]*>")
_BLANK_LINES = re.compile(r"\n[ \t]*(?:\n[ \t]*)+")


def _drop_invisible(text: str) -> str:
    """`text` without script/style/noscript/template elements and comments, in one pass."""
    kept, pos = [], 0
    while (m := _INVISIBLE_OPEN.search(text, pos)) is not None:
        kept.append(text[pos:m.start()])
        if m.group(1) is None:  # a comment
            end = text.find("-->", m.end())
            pos = len(text) if end < 0 else end + 3
        else:
            close = _CLOSE[m.group(1).lower()].search(text, m.end())
            pos = len(text) if close is None else close.end()
    kept.append(text[pos:])
    return "".join(kept)


@register_rule("strip_html")
class StripHtml(Transform):
    def apply(self, doc: Document) -> Document:
        text = _TAG.sub("", _BLOCK.sub("\n", _drop_invisible(doc.text)))
        text = _BLANK_LINES.sub("\n\n", html.unescape(text)).strip()
        return replace(doc, text=text)


@register_rule("min_upvotes")
class MinUpvotes(Filter):
    """Metadata rule for forum data; documents without the key are not forum posts and pass."""

    def __init__(self, min_upvotes: int = 3, key: str = "upvotes"):
        self.min_upvotes = check_number("min_upvotes", min_upvotes, integer=True, minimum=-math.inf)
        if not isinstance(key, str) or not key:
            raise OptionError("key", f"expected a metadata field name, got {key!r}")
        self.key = key

    def keep(self, doc: Document) -> tuple[bool, str]:
        if self.key not in doc.meta:
            return True, ""
        value: Any = doc.meta[self.key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False, f"{self.key}={value!r} is not a number"
        return (True, "") if value >= self.min_upvotes else (False, f"{self.key}={value}<{self.min_upvotes}")
