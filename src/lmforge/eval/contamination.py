"""E2: train/test overlap of zero-shot tasks, by word n-grams as GPT-3 measured it (13-grams).

An item is contaminated when any n-gram of its text (the context followed by the gold choice, the
text the model is scored on) also occurs in a training document. Words are lower-cased runs of
letters and digits, punctuation dropped; CJK ideographs and kana, written without spaces, count one
character per word. The task n-grams are collected first (small), then the training documents
stream past once, so memory stays bounded by the tasks, not the corpus.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
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


def overlapping(texts: Sequence[str], train_docs: Iterable[Any], n: int = 13) -> set[int]:
    """Indices of the texts that share an n-gram with a training document. `train_docs` yields strings or
    objects with `.text` (Documents) and is read once."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    owners: dict[NGram, set[int]] = {}  # n-gram -> the texts that contain it
    for i, text in enumerate(texts):
        for gram in ngrams(words(text), n):
            owners.setdefault(gram, set()).add(i)
    hit: set[int] = set()
    for doc in train_docs:
        if not owners:
            break  # every n-gram found: the rest of the corpus cannot add a text
        for gram in ngrams(words(doc if isinstance(doc, str) else doc.text), n):
            hit |= owners.pop(gram, set())  # popped: a found n-gram needs no second look
    return hit


def contamination(task_paths: Iterable[str | Path], train_docs: Iterable[Any], n: int = 13,
                  checked: Iterable[str | Path] = ()) -> dict[str, Any]:
    """Per task (keyed as evaluate_tasks keys it): items (valid ones), contaminated (items sharing an
    n-gram with the training documents), share, too_short (items under n words, which cannot match),
    ngram (n) and contaminated_ids (the first MAX_LISTED). Tasks whose path is in `checked` were
    built clean against these documents at this n (the built-in task): they are reported without
    another pass over the training set, which is not read at all when every task is checked."""
    paths = task_names(task_paths)
    tasks = {name: load_tasks(path)[0] for name, path in paths.items()}
    clean = {Path(p).resolve() for p in checked}
    keys = [(name, i) for name, items in tasks.items() if paths[name].resolve() not in clean
            for i in range(len(items))]
    hit = overlapping([item_text(tasks[name][i]) for name, i in keys], train_docs, n) if keys else set()
    dirty = {keys[k] for k in hit}
    return {name: _report(name, items, dirty, n) for name, items in tasks.items()}


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
