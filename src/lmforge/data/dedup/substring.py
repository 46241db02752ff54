"""Exact-substring dedup (Lee et al. 2022): a suffix array over the whole corpus finds every span of
at least `min_bytes` bytes that occurs more than once; every occurrence but the first is cut.

- map writes one task's documents as UTF-8 bytes, each followed by 0xFF (a byte UTF-8 never uses,
  so no match runs through it unnoticed), plus a (key, offset, length) table.
- reduce concatenates the tasks in corpus (key) order, builds the suffix array (pydivsufsort) and
  its LCP array (Kasai). Suffixes that share a prefix of >= min_bytes bytes sit next to each other
  in suffix order, in runs where every adjacent LCP is >= min_bytes: within such a run each
  position but the smallest starts a min_bytes-long window seen earlier in the corpus. Every byte
  of a longer repeated span lies in such a window, so the union of these windows is exactly what
  "spans of >= min_bytes bytes, after their first occurrence" covers. The union is merged into
  ranges, snapped inward to whole UTF-8 characters, and written per task as doc-relative byte
  offsets.
- apply cuts the ranges; a document left with fewer than `min_chars_left` characters is dropped.

A run repeating itself with a period shorter than min_bytes ("=====...", "abab...") overlaps its
own earlier copy, so it is cut down to its first period.

Memory: the reduce holds the corpus, a 4-byte suffix array and a 4-byte LCP array at once, plus
Kasai's 4-byte rank array while it runs: about 13 bytes per corpus byte (PEAK_BYTES_PER_BYTE). A
corpus above `max_bytes` is refused before anything is allocated rather than left to swap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.dedup.base import DedupStep, key_task, register_dedup
from lmforge.data.document import Document

SEPARATOR = b"\xff"  # never a byte of UTF-8 text
PEAK_BYTES_PER_BYTE = 13  # corpus 1 + suffix array 4 + LCP 4 + Kasai's rank array 4 (int32)
INT32_LIMIT = 2**31 - 1  # pydivsufsort's int32 suffix array; beyond, every array doubles
_TABLE = np.dtype([("key", "<i8"), ("offset", "<i8"), ("n_bytes", "<i8")])


@dataclasses.dataclass(frozen=True, eq=False)  # numpy fields have no truth-valued ==
class Cuts:
    """The byte ranges [start, end) to cut from one document (its length checks it is the same text)."""

    n_bytes: int
    spans: np.ndarray  # (n, 2) int64, sorted, disjoint, on UTF-8 character boundaries


@register_dedup("substring")
class SubstringDedup(DedupStep):
    """Cuts repeated spans of >= `min_bytes` bytes after their first occurrence in corpus order."""

    def __init__(self, min_bytes: int = 100, min_chars_left: int = 50, max_bytes: int = 2**30):
        if min_bytes < 1:
            raise ValueError(f"min_bytes: must be >= 1, got {min_bytes}")
        if min_chars_left < 0:
            raise ValueError(f"min_chars_left: must be >= 0, got {min_chars_left}")
        if not 0 < max_bytes <= INT32_LIMIT:
            raise ValueError(f"max_bytes: must be in (0, {INT32_LIMIT}] (int32 suffix array), got {max_bytes}")
        self.min_bytes = min_bytes
        self.min_chars_left = min_chars_left
        self.max_bytes = max_bytes

    def map(self, docs: Iterable[tuple[int, Document]], out: Path) -> None:
        rows: list[tuple[int, int, int]] = []
        offset, last_key = 0, -1
        with open(out / "text.bin", "wb") as f:
            for key, doc in docs:
                if key <= last_key:  # "first occurrence" means smallest key, so bytes must follow keys
                    raise ValueError(f"substring: document keys must increase within a task ({key} after {last_key})")
                raw = doc.text.encode("utf-8")
                f.write(raw)
                f.write(SEPARATOR)
                rows.append((key, offset, len(raw)))
                offset += len(raw) + 1
                last_key = key
        np.save(out / "docs.npy", np.array(rows, dtype=_TABLE))

    def reduce(self, task_dirs: list[Path], out: Path) -> dict[str, Any]:
        tables, dirs = _tables_in_key_order(task_dirs)
        total = sum(int(t["offset"][-1] + t["n_bytes"][-1] + 1) for t in tables)
        summary: dict[str, Any] = {"bytes": total, "peak_memory_estimate_bytes": PEAK_BYTES_PER_BYTE * total}
        if total > self.max_bytes:
            raise ValueError(
                f"substring: the corpus is {total:,} bytes, above max_bytes={self.max_bytes:,}; its suffix array "
                f"would need about {PEAK_BYTES_PER_BYTE * total / 2**30:.1f} GiB. Raise max_bytes if the machine "
                "has the memory, or dedup the sources in separate runs."
            )
        table = _global_table(tables)
        data = _read_corpus(dirs, total)
        spans = _repeated_spans(data, table, self.min_bytes)
        summary.update(_write_cuts(spans, table, out))
        summary.update({"docs": len(table), "min_bytes": self.min_bytes})
        return summary

    def load(self, out: Path, task: int) -> dict[int, Cuts]:
        path = out / f"task-{task:06d}.npz"
        if not path.exists():
            return {}
        with np.load(path) as z:
            keys, n_bytes, bounds, spans = z["keys"], z["n_bytes"], z["bounds"], z["spans"]
        return {
            int(k): Cuts(int(n), spans[bounds[i] : bounds[i + 1]])
            for i, (k, n) in enumerate(zip(keys, n_bytes, strict=True))
        }

    def apply(self, decisions: dict[int, Cuts], key: int, doc: Document) -> tuple[Document | None, str, dict]:
        cuts = decisions.get(key)
        if cuts is None:
            return doc, "", {}
        raw = doc.text.encode("utf-8")
        if len(raw) != cuts.n_bytes:
            raise ValueError(f"substring: document {doc.id!r} changed between map and apply")
        text = _cut(raw, cuts.spans).decode("utf-8")  # strict: the spans sit on character boundaries
        first_start, first_end = (int(x) for x in cuts.spans[0])
        detail = {
            "removed_byte_spans": cuts.spans.tolist(),  # [start, end) in UTF-8 bytes of the original text
            "removed_bytes": int((cuts.spans[:, 1] - cuts.spans[:, 0]).sum()),
            "first_removed": raw[first_start:first_end].decode("utf-8")[:80],
            "kept_chars": len(text),
        }
        left = len(text.strip())
        if left < self.min_chars_left:
            return None, f"substring_left={left}<{self.min_chars_left}", detail
        return dataclasses.replace(doc, text=text), "", detail


def _tables_in_key_order(task_dirs: list[Path]) -> tuple[list[np.ndarray], list[Path]]:
    """Non-empty task tables ordered by first key, so byte position in the concatenation is key order."""
    loaded = [(np.load(d / "docs.npy"), d) for d in task_dirs]
    loaded = sorted((pair for pair in loaded if len(pair[0])), key=lambda pair: int(pair[0]["key"][0]))
    return [t for t, _ in loaded], [d for _, d in loaded]


def _global_table(tables: list[np.ndarray]) -> np.ndarray:
    """One table for the concatenated corpus: offsets shifted by each task's start."""
    parts, base = [], 0
    for t in tables:
        shifted = t.copy()
        shifted["offset"] += base
        parts.append(shifted)
        base += int(t["offset"][-1] + t["n_bytes"][-1] + 1)
    table = np.concatenate(parts) if parts else np.zeros(0, dtype=_TABLE)
    if np.any(np.diff(table["key"]) <= 0):
        raise ValueError("substring: tasks hold interleaved document keys; corpus order is ambiguous")
    return table


def _read_corpus(dirs: list[Path], total: int) -> np.ndarray:
    """The concatenated task bytes in one writable array (pydivsufsort refuses read-only buffers)."""
    data = np.empty(total, dtype=np.uint8)
    at = 0
    for d in dirs:
        with open(d / "text.bin", "rb") as f:
            at += f.readinto(memoryview(data)[at:])
    if at != total:
        raise ValueError(f"substring: read {at} corpus bytes, the tables say {total}")
    return data


def _repeated_spans(data: np.ndarray, table: np.ndarray, k: int) -> np.ndarray:
    """(n, 2) global byte ranges covered by a k-byte window that occurs earlier, merged and snapped."""
    starts = _later_window_starts(data, k)
    # A window through a separator joins two documents; the whole run shares it, so drop such starts.
    separators = table["offset"] + table["n_bytes"]
    next_sep = separators[np.searchsorted(separators, starts)]
    starts = np.sort(starts[next_sep - starts >= k])
    if len(starts) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    # Windows all have length k: a gap between consecutive starts larger than k ends a range.
    new_range = np.flatnonzero(np.diff(starts) > k) + 1
    first = np.concatenate([[0], new_range])
    last = np.concatenate([new_range - 1, [len(starts) - 1]])
    return _snap(data, starts[first], starts[last] + k)


def _later_window_starts(data: np.ndarray, k: int) -> np.ndarray:
    """Positions whose next k bytes also start at a smaller position (runs of LCP >= k, minus each min)."""
    if len(data) == 0:
        return np.zeros(0, dtype=np.int64)
    import pydivsufsort  # heavy C extension; only this step needs it

    sa = pydivsufsort.divsufsort(data)
    shared = pydivsufsort.kasai(data, sa) >= k  # shared[i]: ranks i and i+1 share >= k bytes
    in_run = shared.copy()
    in_run[1:] |= shared[:-1]
    ranks = np.flatnonzero(in_run)
    positions = sa[ranks].astype(np.int64)
    del sa
    run_starts = np.flatnonzero(~shared[ranks - 1] | (ranks == 0))
    run_min = np.minimum.reduceat(positions, run_starts) if len(run_starts) else positions
    sizes = np.diff(np.append(run_starts, len(ranks)))
    return positions[positions != np.repeat(run_min, sizes)]


def _snap(data: np.ndarray, begin: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Shrink each range inward to whole characters: begin forward and end back past continuation
    bytes (10xxxxxx; at most 3 in a row). A range left empty is dropped."""
    n = len(data)
    for _ in range(3):
        begin = np.where((begin < end) & _is_continuation(data, begin, n), begin + 1, begin)
        end = np.where((end > begin) & _is_continuation(data, end, n), end - 1, end)
    keep = end > begin
    return np.stack([begin[keep], end[keep]], axis=1)


def _is_continuation(data: np.ndarray, at: np.ndarray, n: int) -> np.ndarray:
    inside = at < n
    byte = data[np.minimum(at, n - 1)]
    return inside & ((byte & 0xC0) == 0x80)


def _write_cuts(spans: np.ndarray, table: np.ndarray, out: Path) -> dict[str, Any]:
    """Per task file: the keys of documents with cuts, their lengths, and doc-relative spans."""
    doc = np.searchsorted(table["offset"], spans[:, 0], side="right") - 1
    rel = spans - table["offset"][doc][:, None]
    docs_hit, first_span = np.unique(doc, return_index=True)
    bounds_all = np.append(first_span, len(spans))
    tasks = np.array([key_task(int(k)) for k in table["key"][docs_hit]], dtype=np.int64)
    for task in np.unique(tasks):
        pick = np.flatnonzero(tasks == task)
        lo, hi = bounds_all[pick[0]], bounds_all[pick[-1] + 1]
        np.savez(
            out / f"task-{int(task):06d}.npz",
            keys=table["key"][docs_hit[pick]],
            n_bytes=table["n_bytes"][docs_hit[pick]],
            bounds=bounds_all[np.append(pick, pick[-1] + 1)] - lo,
            spans=rel[lo:hi],
        )
    return {"docs_cut": len(docs_hit), "spans": len(spans), "removed_bytes": int((spans[:, 1] - spans[:, 0]).sum())}


def _cut(raw: bytes, spans: np.ndarray) -> bytes:
    pieces, at = [], 0
    for start, end in spans.tolist():
        pieces.append(raw[at:start])
        at = end
    pieces.append(raw[at:])
    return b"".join(pieces)
