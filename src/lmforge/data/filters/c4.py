"""C4's clean-up (Raffel et al. 2020, and the TFDS `c4_utils` reference code; /work/shared/DATA_RULES.md).

A `Rewriter`: lines that fail the line rules are removed, and the whole page is dropped when a page
rule fails. Line rules: keep a line only if it ends in terminal punctuation and not in an ellipsis,
has at least `min_words_per_line` words, no word over `max_word_length` characters, and no mention
of javascript or of a cookie / terms-of-use policy; wiki citation markers ([1], [edit]) are cut.
Page rules: drop on "lorem ipsum" or a curly bracket in a kept line, or fewer than `min_sentences`
sentences in the kept lines. The bad-words rule of the paper is not shipped (its list is a download).

How each statistic is defined for Chinese:
- terminal punctuation adds 。！？；and the closing quotes ” ’ 」 』 to . ! ? " '; a line ending in
  "……" (the Chinese ellipsis) is removed like one ending in "...";
- words per line count each CJK character as a word (`textstats.words`), since a Chinese line has
  no spaces to split on; the 1000-character word limit applies to space-separated runs either way;
- sentences are counted at . ! ? followed by a space or the line end, and at every 。！？；;
- policy phrases add 隐私政策 (privacy policy), 使用条款/服务条款 (terms of use), 用户协议 and
  "cookie" written next to Chinese, and citation markers add [编辑] and [来源请求].
"""

from __future__ import annotations

import re
from dataclasses import replace

from lmforge.data import textstats
from lmforge.data.document import Document
from lmforge.data.filters.base import OptionError, Rewriter, check_number, register_rule

_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]|\[编辑\]|\[来源请求\]")
_LINE_ENDS = (".", "?", "!", '"', "'", "。", "！", "？", "；", "”", "’", "」", "』")
_ELLIPSES = ("...", "…")
_POLICY = re.compile(
    "terms of use|privacy policy|cookie policy|uses cookies|use of cookies|use cookies"
    "|隐私政策|使用条款|服务条款|用户协议|cookie政策|使用cookie"
)
# A sentence ends at . ! ? (with any closing quotes) before a space or the end of the line, or at a
# Chinese terminator, which is never followed by a space.
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)]*(?=\s|$)|[。！？；]+[”’」』]*")


@register_rule("c4")
class C4(Rewriter):
    """C4's line and page rules; options switch each rule or set its threshold (-1 disables a number)."""

    def __init__(
        self,
        min_words_per_line: int = 3,
        max_word_length: int = 1000,
        min_sentences: int = 5,
        remove_citations: bool = True,
        filter_no_terminal_punct: bool = True,
        filter_lorem_ipsum: bool = True,
        filter_javascript: bool = True,
        filter_curly_bracket: bool = True,
        filter_policy: bool = True,
    ):
        self.min_words_per_line = check_number("min_words_per_line", min_words_per_line, integer=True, minimum=-1)
        self.max_word_length = check_number("max_word_length", max_word_length, integer=True, minimum=-1)
        self.min_sentences = check_number("min_sentences", min_sentences, integer=True, minimum=-1)
        self.remove_citations = _flag("remove_citations", remove_citations)
        self.filter_no_terminal_punct = _flag("filter_no_terminal_punct", filter_no_terminal_punct)
        self.filter_lorem_ipsum = _flag("filter_lorem_ipsum", filter_lorem_ipsum)
        self.filter_javascript = _flag("filter_javascript", filter_javascript)
        self.filter_curly_bracket = _flag("filter_curly_bracket", filter_curly_bracket)
        self.filter_policy = _flag("filter_policy", filter_policy)

    def process(self, doc: Document) -> tuple[Document | None, str]:
        kept: list[str] = []
        n_sentences = 0
        for raw in doc.text.splitlines():
            line, page_reason = self._line(raw.strip())
            if page_reason:
                return None, page_reason
            if line:
                kept.append(line)
                n_sentences += max(1, len(_SENTENCE_END.findall(line)))
        if self.min_sentences != -1 and n_sentences < self.min_sentences:
            return None, f"c4_sentences={n_sentences}<{self.min_sentences}"
        text = "\n".join(kept).strip()
        return (doc, "") if text == doc.text else (replace(doc, text=text), "")

    def _line(self, line: str) -> tuple[str, str]:
        """(the line to keep or "", a page-drop reason or "")."""
        # Only a line longer than the limit can hold a word longer than it; most lines are not split at all.
        limit = self.max_word_length
        if limit != -1 and len(line) > limit and any(len(w) > limit for w in line.split()):
            return "", ""
        n_words = _n_words(line)  # before citations are cut, as the reference counts
        if self.remove_citations:
            line = _CITATION.sub("", line)
        if self.filter_no_terminal_punct and (not line.endswith(_LINE_ENDS) or line.endswith(_ELLIPSES)):
            return "", ""
        if n_words < self.min_words_per_line:
            return "", ""
        lower = line.lower()
        if self.filter_lorem_ipsum and "lorem ipsum" in lower:
            return "", "c4_lorem_ipsum"
        if self.filter_javascript and "javascript" in lower:
            return "", ""
        if self.filter_curly_bracket and ("{" in line or "｛" in line):
            return "", "c4_curly_bracket"
        if self.filter_policy and _POLICY.search(lower):
            return "", ""
        return line, ""


def _n_words(line: str) -> int:
    # Whitespace words as the reference counts them, unless the line is CJK, where each character counts.
    return len(textstats.words(line)) if textstats.has_cjk(line) else len(line.split())


def _flag(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise OptionError(key, f"expected true or false, got {value!r}")
    return value
