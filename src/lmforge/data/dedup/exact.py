"""Exact dedup by digest, cross-shard: documents (or ids) whose 128-bit digests are equal.

map writes each task's digests, keys and ids sorted by digest (24 bytes a document plus the id);
reduce merges the sorted task files in one streaming pass (heapq.merge), so memory holds one
record per task, not the corpus, and keeps the smallest key of each digest; apply removes the rest,
naming the kept document.

Prose collapses whitespace before hashing (reflowed copies of a page are the same text); code keeps
its indentation (Python programs differing only in indentation are different programs), so sources
listed in `code_sources` hash their lines with trailing whitespace stripped only.
"""

from __future__ import annotations

import heapq
import json
from abc import abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from lmforge.data.dedup.base import DedupStep, key_task, register_dedup
from lmforge.data.document import Document

_RECORD = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("key", "<i8")])


def text_digest(text: str) -> bytes:
    """xxh3-128 of the text with whitespace runs collapsed and ends stripped (16 bytes)."""
    return xxhash.xxh3_128_digest(" ".join(text.split()).encode("utf-8"))


def code_digest(text: str) -> bytes:
    """xxh3-128 of the text with line ends normalised, trailing whitespace stripped per line and
    blank lines at either end dropped."""
    lines = [line.rstrip() for line in text.splitlines()]
    return xxhash.xxh3_128_digest("\n".join(lines).strip("\n").encode("utf-8"))


class DigestDedup(DedupStep):
    """Keeps the smallest key per digest; subclasses say what is digested and how a removal reads."""

    reason = "duplicate"

    @abstractmethod
    def digest(self, doc: Document) -> bytes:
        """What makes two documents duplicates, as 16 bytes."""

    def map(self, docs: Iterable[tuple[int, Document]], out: Path) -> None:
        rows, ids = [], {}
        for key, doc in docs:
            d = self.digest(doc)
            rows.append((int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little"), key))
            ids[key] = (doc.id, doc.source)
        table = np.array(rows, dtype=_RECORD)
        table.sort(order=["hi", "lo", "key"])
        np.save(out / "digests.npy", table)
        (out / "ids.json").write_text(json.dumps({str(k): v for k, v in ids.items()}), encoding="utf-8")

    def reduce(self, task_dirs: list[Path], out: Path) -> dict[str, Any]:
        """One merge over every task's sorted digests; a removal records (removed key, kept key)."""
        removed: list[tuple[int, int]] = []
        previous: tuple[int, int] | None = None
        kept_key = -1
        streams = [_rows(d / "digests.npy") for d in task_dirs]
        for hi, lo, key in heapq.merge(*streams):
            if (hi, lo) == previous:
                removed.append((key, kept_key))
            else:
                previous, kept_key = (hi, lo), key
        kept_ids = _ids_of({k for _, k in removed}, task_dirs)
        by_task: dict[int, list[list[Any]]] = {}
        for key, kept in removed:
            by_task.setdefault(key_task(key), []).append([key, kept, *kept_ids[kept]])
        for task, rows in by_task.items():
            (out / f"task-{task:06d}.json").write_text(json.dumps(rows), encoding="utf-8")
        return {"removed": len(removed), "kept_with_duplicates": len({k for _, k in removed})}

    def load(self, out: Path, task: int) -> dict[int, list[Any]]:
        path = out / f"task-{task:06d}.json"
        if not path.exists():
            return {}
        return {row[0]: row[1:] for row in json.loads(path.read_text(encoding="utf-8"))}

    def apply(self, decisions: dict[int, list[Any]], key: int, doc: Document) -> tuple[Document | None, str, dict]:
        hit = decisions.get(key)
        if hit is None:
            return doc, "", {}
        kept_key, kept_id, kept_source = hit
        return None, self.reason, self.detail(doc, kept_key, kept_id, kept_source)

    def detail(self, doc: Document, kept_key: int, kept_id: str, kept_source: str) -> dict[str, Any]:
        return {"kept_id": kept_id, "kept_key": kept_key, "hash": self.digest(doc).hex()}


def _rows(path: Path) -> Iterator[tuple[int, int, int]]:
    for row in np.load(path, mmap_mode="r"):
        yield int(row["hi"]), int(row["lo"]), int(row["key"])


def _ids_of(keys: set[int], task_dirs: list[Path]) -> dict[int, tuple[str, str]]:
    """(id, source) of the kept documents that have duplicates, from their tasks' id files."""
    found: dict[int, tuple[str, str]] = {}
    for task in sorted({key_task(k) for k in keys}):
        ids = json.loads((task_dirs[task] / "ids.json").read_text(encoding="utf-8"))
        found.update({k: tuple(ids[str(k)]) for k in keys if key_task(k) == task})
    return found


@register_dedup("exact")
class ExactDedup(DigestDedup):
    """Whole-document exact duplicates; `code_sources` hash with their indentation kept."""

    def __init__(self, code_sources: list[str] | None = None):
        self.code_sources = frozenset(["code"] if code_sources is None else code_sources)

    def digest(self, doc: Document) -> bytes:
        return code_digest(doc.text) if doc.source in self.code_sources else text_digest(doc.text)
