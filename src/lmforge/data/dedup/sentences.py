"""In-document repeated-sentence removal: a sentence that appears again later in the same document
is cut after its first occurrence (navigation lines, "Click here to subscribe." repeated under every
section, a paragraph pasted twice).

Sentences end where `textstats.sentences` ends them (after . ! ? followed by whitespace, after
。！？；) and also at line breaks, since boilerplate lines (menus, bylines) carry no terminator.
Two sentences are the same when their whitespace-normalised texts are equal. Sentences shorter than
`min_chars` ("Yes.", "Thanks!") are never removed: their repeats are normal prose. Each sentence
owns the whitespace before it, so cutting one keeps the paragraph break that followed its
predecessor.

Nothing crosses documents, so map and reduce do nothing and apply does all the work.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import regex

from lmforge.data.dedup.base import DedupStep, register_dedup
from lmforge.data.document import Document

# Zero-width split points: before the whitespace after a Latin terminator, after a CJK terminator,
# and before every line break.
_SPLIT = regex.compile(r"(?<=[.!?])(?=\s)|(?<=[。！？；])|(?=\n)")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) character spans covering `text` in order, one per sentence with its leading space."""
    cuts = [0] + [m.start() for m in _SPLIT.finditer(text)] + [len(text)]
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a]


def _normalise(sentence: str) -> str:
    return " ".join(sentence.split())


@register_dedup("repeated_sentences")
class RepeatedSentences(DedupStep):
    """Cuts later copies of a sentence of >= `min_chars` characters within each document."""

    def __init__(self, min_chars: int = 30, min_chars_left: int = 50):
        if min_chars < 1:
            raise ValueError(f"min_chars: must be >= 1, got {min_chars}")
        if min_chars_left < 0:
            raise ValueError(f"min_chars_left: must be >= 0, got {min_chars_left}")
        self.min_chars = min_chars
        self.min_chars_left = min_chars_left

    def map(self, docs: Iterable[tuple[int, Document]], out: Path) -> None:
        """Nothing to share across documents."""

    def reduce(self, task_dirs: list[Path], out: Path) -> dict[str, Any]:
        return {}

    def load(self, out: Path, task: int) -> None:
        return None

    def apply(self, decisions: None, key: int, doc: Document) -> tuple[Document | None, str, dict]:
        removed, n_sentences = self.repeated(doc.text)
        if not removed:
            return doc, "", {}
        pieces, at = [], 0
        for start, end in removed:
            pieces.append(doc.text[at:start])
            at = end
        pieces.append(doc.text[at:])
        text = "".join(pieces)
        detail = {
            "removed_char_spans": [list(span) for span in removed],  # [start, end) in characters of the original
            "removed_sentences": n_sentences,
            "first_removed": _normalise(doc.text[removed[0][0] : removed[0][1]])[:80],
            "kept_chars": len(text),
        }
        left = len(text.strip())
        if left < self.min_chars_left:
            return None, f"sentences_left={left}<{self.min_chars_left}", detail
        return dataclasses.replace(doc, text=text), "", detail

    def repeated(self, text: str) -> tuple[list[tuple[int, int]], int]:
        """Spans of the sentences seen earlier in `text` (adjacent ones merged), and how many sentences."""
        seen: set[str] = set()
        removed: list[tuple[int, int]] = []
        n_sentences = 0
        for start, end in sentence_spans(text):
            norm = _normalise(text[start:end])
            if len(norm) < self.min_chars:
                continue
            if norm not in seen:
                seen.add(norm)
                continue
            n_sentences += 1
            if removed and removed[-1][1] == start:
                removed[-1] = (removed[-1][0], end)
            else:
                removed.append((start, end))
        return removed, n_sentences
