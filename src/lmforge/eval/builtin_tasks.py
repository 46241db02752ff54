"""E2: a small built-in zero-shot task made from documents (the built-in corpus's prose by default), so
every run, `make demo` included, reports a zero-shot accuracy without downloading a benchmark.

`continuation`: a passage's first CONTEXT_WORDS words are the context; the true next CHOICE_WORDS words
and the same span of 3 other documents are the 4 choices. Whitespace is collapsed to single spaces, so
a choice's length in characters measures its words alike. Deterministic for given documents and seed.
Pass held-out documents (the run's `data/val`) and the training documents as `exclude`: the standard
library repeats itself (a docstring is also inside its module's source, `_pyio` copies `io`), so even
held-out passages can be in the training set, which would make the task a memorisation test.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.data.document import Document
from lmforge.eval.contamination import overlapping
from lmforge.io_utils import atomic_write_text

TASK_NAME = "builtin_continuation"
CONTEXT_WORDS = 24
CHOICE_WORDS = 10
N_CHOICES = 4
PASSAGES_PER_DOC = 3  # later passages of long documents (the help() topics) when documents are few
PREFERRED_SOURCE = "prose"  # code loses its layout when whitespace is collapsed


@dataclass(frozen=True)
class _Passage:
    id: str
    context: str
    continuation: str  # with its leading space, as appended to the context


def _passages(doc: Document) -> list[_Passage]:
    words = doc.text.split()
    size = CONTEXT_WORDS + CHOICE_WORDS
    out = []
    for k in range(min(PASSAGES_PER_DOC, len(words) // size)):
        chunk = words[k * size:(k + 1) * size]
        out.append(_Passage(f"{doc.id}#{k}", " ".join(chunk[:CONTEXT_WORDS]), " " + " ".join(chunk[CONTEXT_WORDS:])))
    return out


def _collect(documents: Iterable[Document]) -> list[_Passage]:
    """Passages of the preferred source (of every source if it has none), by id, one per context:
    a repeated docstring must not give two items whose choices contradict each other."""
    by_source: dict[bool, list[_Passage]] = {True: [], False: []}
    for doc in documents:
        by_source[doc.source == PREFERRED_SOURCE].extend(_passages(doc))
    passages, seen = [], set()
    for p in sorted(by_source[True] or by_source[False], key=lambda p: p.id):
        if p.context not in seen:
            seen.add(p.context)
            passages.append(p)
    return passages


def build_items(documents: Iterable[Document], n_items: int = 200, seed: int = 0,
                exclude: Iterable[Any] | None = None) -> list[dict[str, object]]:
    """Task records `{"id", "context", "choices", "gold"}`; distractors are other documents' spans.
    Passages sharing a 13-gram with an `exclude` document (the training set) are left out."""
    passages = _collect(documents)
    if exclude is not None:
        dirty = overlapping([p.context + p.continuation for p in passages], exclude)
        passages = [p for i, p in enumerate(passages) if i not in dirty]
    docs = {_doc_id(p) for p in passages}
    if len(docs) < N_CHOICES:
        raise ValueError(f"the built-in task needs passages of {CONTEXT_WORDS + CHOICE_WORDS}+ words from at "
                         f"least {N_CHOICES} documents; got {len(docs)}")
    rng = random.Random(seed)
    order = list(range(len(passages)))
    rng.shuffle(order)
    items = []
    for i in order:
        if len(items) == n_items:
            break
        item = _item(passages, i, rng)
        if item is not None:
            items.append(item)
    return items


def _doc_id(p: _Passage) -> str:
    return p.id.rsplit("#", 1)[0]


def _item(passages: list[_Passage], i: int, rng: random.Random) -> dict[str, object] | None:
    """The item of passage i, its distractors other documents' distinct spans; None if too few differ."""
    gold = passages[i]
    others = [p.continuation for p in passages if _doc_id(p) != _doc_id(gold) and p.continuation != gold.continuation]
    distinct = list(dict.fromkeys(others))  # first-seen order keeps the draw deterministic
    if len(distinct) < N_CHOICES - 1:
        return None
    choices = [gold.continuation, *rng.sample(distinct, N_CHOICES - 1)]
    rng.shuffle(choices)
    return {"id": gold.id, "context": gold.context, "choices": choices, "gold": choices.index(gold.continuation)}


def builtin_task_file(out_dir: str | Path, documents: Iterable[Document], n_items: int = 200, seed: int = 0,
                      exclude: Iterable[Any] | None = None) -> Path:
    """Write `out_dir/builtin_continuation.jsonl` (see the module docstring and build_items) and return
    its path. Raises ValueError when the documents give passages from fewer than 4 documents."""
    items = build_items(documents, n_items, seed, exclude)
    path = Path(out_dir) / f"{TASK_NAME}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    return path
