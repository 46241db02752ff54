"""E2: train/test overlap of zero-shot tasks, by word n-grams as GPT-3 measured it (13-grams).

An item is contaminated when any n-gram of its text (the context followed by the gold choice, the
text the model is scored on) also occurs in a training document. Words are lower-cased runs of
letters and digits, punctuation dropped; CJK ideographs and kana, written without spaces, count one
character per word. The task n-grams are collected first (small), then the training documents
stream past once, so memory stays bounded by the tasks, not the corpus.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lmforge.eval.tasks import TaskItem, load_tasks, task_names

# Han (with extension A and compatibility ideographs), hiragana and katakana.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+")
MAX_LISTED = 20  # contaminated ids listed per task; the count covers them all

NGram = tuple[str, ...]


def words(text: str) -> list[str]:
    """The words n-grams are made of (see the module docstring)."""
    return [w.lower() for w in _WORD.findall(text)]


def ngrams(tokens: list[str], n: int) -> Iterator[NGram]:
    for i in range(len(tokens) - n + 1):
        yield tuple(tokens[i:i + n])


def item_text(item: TaskItem) -> str:
    return item.context + item.choices[item.gold]


def contamination(task_paths: Iterable[str | Path], train_docs: Iterable[Any], n: int = 13) -> dict[str, Any]:
    """Per task (keyed as evaluate_tasks keys it): items (valid ones), contaminated (items sharing an n-gram with the
    training documents), share, too_short (items under n words, which cannot match) and
    contaminated_ids (the first MAX_LISTED). `train_docs` yields strings or objects with `.text`
    (Documents); it is read once."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    tasks = {name: load_tasks(path)[0] for name, path in task_names(task_paths).items()}
    owners: dict[NGram, set[tuple[str, int]]] = {}  # n-gram -> (task, item index) that contain it
    for name, items in tasks.items():
        for i, item in enumerate(items):
            for gram in ngrams(words(item_text(item)), n):
                owners.setdefault(gram, set()).add((name, i))
    hit: set[tuple[str, int]] = set()
    for doc in train_docs:
        text = doc if isinstance(doc, str) else doc.text
        for gram in ngrams(words(text), n):
            found = owners.pop(gram, None)  # popped: a found n-gram needs no second look
            if found:
                hit |= found
    return {name: _report(name, items, hit, n) for name, items in tasks.items()}


def _report(name: str, items: list[TaskItem], hit: set[tuple[str, int]], n: int) -> dict[str, Any]:
    dirty = [i for i in range(len(items)) if (name, i) in hit]
    return {
        "items": len(items),
        "contaminated": len(dirty),
        "share": len(dirty) / len(items) if items else 0.0,
        "too_short": sum(len(words(item_text(it))) < n for it in items),
        "ngram": n,
        "contaminated_ids": [items[i].id for i in dirty[:MAX_LISTED]],
    }
