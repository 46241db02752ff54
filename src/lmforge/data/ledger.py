"""Accounting for every document: counts per (step, source) and one JSON line per removal.

The pipeline counts what enters and leaves each step; steps only report removals. `check()` then
proves nothing was lost or invented: in = kept + removed inside each step, and each step's input
equals the previous step's output, per source.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from lmforge.data.document import Document


class LedgerMismatch(AssertionError):
    """Documents were lost or invented between or inside steps: a bug in a step, not in the data."""


@dataclass
class Counts:
    docs_in: int = 0
    docs_kept: int = 0
    docs_removed: int = 0
    bytes_in: int = 0
    bytes_kept: int = 0
    bytes_removed: int = 0


class Ledger:
    def __init__(self, removed_path: Path | None = None, steps: Sequence[str] = ()):
        """`steps` fixes the step order for `check()`; steps first seen later are appended."""
        self.steps: list[str] = []
        # Where the document being processed came from ({"file", "line"}), added to its removal record
        # so every removal points back at its input.
        self.origin: dict[str, Any] = {}
        self._counts: dict[str, dict[str, Counts]] = {}
        for step in steps:
            self._step(step)
        # Opened once: removals can number millions, and reopening per line would dominate.
        self._removed: IO[str] | None = None
        if removed_path is not None:
            Path(removed_path).parent.mkdir(parents=True, exist_ok=True)
            self._removed = open(removed_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def _step(self, step: str) -> dict[str, Counts]:
        if step not in self._counts:
            self.steps.append(step)
            self._counts[step] = {}
        return self._counts[step]

    def _cell(self, step: str, source: str) -> Counts:
        return self._step(step).setdefault(source, Counts())

    # ------------------------------------------------------------------ recording

    def count_in(self, step: str, source: str, n_bytes: int) -> None:
        cell = self._cell(step, source)
        cell.docs_in += 1
        cell.bytes_in += n_bytes

    def count_kept(self, step: str, source: str, n_bytes: int) -> None:
        cell = self._cell(step, source)
        cell.docs_kept += 1
        cell.bytes_kept += n_bytes

    def record_removed(
        self,
        doc_or_id: Document | str,
        step: str,
        reason: str,
        detail: dict[str, Any] | None = None,
        *,
        source: str | None = None,
        n_bytes: int = 0,
    ) -> None:
        """Count a removal and append {id, source, step, reason, detail} to the removed-records file.

        With a bare id (input too broken to become a Document) pass `source` and `n_bytes`.
        """
        if isinstance(doc_or_id, Document):
            doc_id, source, n_bytes = doc_or_id.id, doc_or_id.source, doc_or_id.n_bytes
        else:
            doc_id = doc_or_id
            if source is None:
                raise ValueError("record_removed with a bare id needs source=")
        cell = self._cell(step, source)
        cell.docs_removed += 1
        cell.bytes_removed += n_bytes
        if self._removed is not None:
            detail = {**self.origin, **(detail or {})}
            record = {"id": doc_id, "source": source, "step": step, "reason": reason, "detail": detail}
            self._removed.write(json.dumps(record, ensure_ascii=False) + "\n")

    def add_counts(self, counts: dict[str, dict[str, dict[str, int]]]) -> None:
        """Add another ledger's `to_json()["counts"]` (one task's part) to this one."""
        for step, by_source in counts.items():
            for source, c in by_source.items():
                cell = self._cell(step, source)
                for k, v in c.items():
                    setattr(cell, k, getattr(cell, k) + v)

    def close(self) -> None:
        if self._removed is not None:
            self._removed.close()
            self._removed = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ reading

    def counts(self, step: str, source: str) -> Counts:
        return self._counts.get(step, {}).get(source, Counts())

    def sources(self) -> list[str]:
        return sorted({s for by_source in self._counts.values() for s in by_source})

    def check(self) -> None:
        previous: str | None = None
        for step in self.steps:
            for source in self.sources():
                c = self.counts(step, source)
                if c.docs_in != c.docs_kept + c.docs_removed:
                    raise LedgerMismatch(
                        f"step {step!r}, source {source!r}: in={c.docs_in} != "
                        f"kept={c.docs_kept} + removed={c.docs_removed}"
                    )
                if previous is not None and c.docs_in != self.counts(previous, source).docs_kept:
                    raise LedgerMismatch(
                        f"source {source!r}: step {step!r} received {c.docs_in} docs but step "
                        f"{previous!r} kept {self.counts(previous, source).docs_kept}"
                    )
            previous = step

    def per_source(self) -> dict[str, dict[str, int]]:
        """End-to-end numbers per source: what was read, what survived every step, what was removed."""
        if not self.steps:
            return {}
        first, last = self.steps[0], self.steps[-1]
        out = {}
        for source in self.sources():
            removed = [self.counts(step, source) for step in self.steps]
            out[source] = {
                "docs_in": self.counts(first, source).docs_in,
                "docs_kept": self.counts(last, source).docs_kept,
                "docs_removed": sum(c.docs_removed for c in removed),
                "bytes_in": self.counts(first, source).bytes_in,
                "bytes_kept": self.counts(last, source).bytes_kept,
                # Bytes of documents as they were when removed; transforms (strip_html) shrink text
                # too, so bytes_in - bytes_kept can exceed this.
                "bytes_removed": sum(c.bytes_removed for c in removed),
            }
        return out

    def totals(self) -> dict[str, int]:
        keys = ("docs_in", "docs_kept", "docs_removed", "bytes_in", "bytes_kept", "bytes_removed")
        return {k: sum(row[k] for row in self.per_source().values()) for k in keys}

    def to_json(self) -> dict[str, Any]:
        return {
            "steps": list(self.steps),
            "counts": {
                step: {source: asdict(c) for source, c in sorted(by_source.items())}
                for step, by_source in self._counts.items()
            },
            "per_source": self.per_source(),
            "totals": self.totals(),
        }

    def summary_table(self) -> str:
        header = ("step", "source", "in", "kept", "removed", "removed %", "MB kept")
        rows = [header]
        for step in self.steps:
            for source, c in sorted(self._counts[step].items()):
                pct = 100.0 * c.docs_removed / c.docs_in if c.docs_in else 0.0
                rows.append(
                    (step, source, str(c.docs_in), str(c.docs_kept), str(c.docs_removed),
                     f"{pct:.1f}", f"{c.bytes_kept / 1e6:.2f}")
                )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        # Text columns left-aligned, numbers right-aligned.
        lines = [
            "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
            for row in rows
        ]
        lines.insert(1, "-" * len(lines[0]))
        t = self.totals()
        lines.append(f"total: {t['docs_in']} in, {t['docs_kept']} kept, {t['docs_removed']} removed")
        return "\n".join(lines)
