"""The contract of every cross-document dedup step: map -> reduce -> apply.

The data stage splits its inputs into tasks (input files grouped by size, or the built-in corpus; in a fixed order)
and numbers each document by `doc_key(task, index)`: its task's position and its order inside that
task. Both are fixed by the inputs alone, never by the worker that ran the task, so a rule such as
"keep the smallest key of each cluster" keeps the same documents on 1 worker, N workers or Ray.

- `map(docs, out)` runs once per task, in any process: it writes that task's signatures under the
  directory `out` (files only; nothing is returned, nothing is kept in memory across tasks).
- `reduce(task_dirs, out)` runs once, in one process, after every map: it reads the signature
  directories of all tasks (`task_dirs[t]` is task t's `out` of map; a task with no documents left
  still had its map run, on no documents) and writes its decisions under `out`, spilling to disk
  as it goes so memory stays bounded by what one band/bucket/shard needs, not by the corpus. It
  returns a small JSON-able summary for the report (clusters, removed, largest cluster, ...).
- `load(out, task)` reads back the decisions that concern one task's documents (in the apply
  process); `apply(decisions, key, doc)` then returns `(doc, "", detail)` to keep it (possibly
  rewritten, e.g. spans cut; `detail` then says what was cut, or is empty), or
  `(None, reason, detail)` to remove it. The detail of a removal explains it: the kept document's
  id and key, the cluster id and the estimated similarity, or the removed spans.

`out` always exists and is empty when map or reduce is called: the driver runs each in a temporary
directory and renames it into place with a completion marker, so a killed run redoes only what
was unfinished. A step never sees the ledger; the stage driver counts documents in and out and records removals.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

from lmforge.data.document import Document
from lmforge.registry import Registry

DEDUP = Registry("dedup step")

TASK_BITS = 32  # up to 2^32 documents per task and 2^31 tasks in an int64 key


def doc_key(task: int, index: int) -> int:
    """The document's stable position in the corpus: task order first, then order inside the task."""
    return (task << TASK_BITS) | index


def key_task(key: int) -> int:
    return key >> TASK_BITS


class DedupAlarm(RuntimeError):
    """A reduce found something a person should look at before output is written (a giant cluster,
    most of a source removed); `report` is the step's summary. The stage stops, outputs untouched."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


def register_dedup(name: str) -> Callable[[Any], Any]:
    """Register a DedupStep class under `name` (its recipe name) and set its `name` to match."""

    def deco(cls: Any) -> Any:
        cls.name = name
        return DEDUP.register(name)(cls)

    return deco


class DedupStep(ABC):
    """One entry of `data.dedup`; options come from the recipe entry (`{name: minhash, bands: 14}`)."""

    name: ClassVar[str]

    @abstractmethod
    def map(self, docs: Iterable[tuple[int, Document]], out: Path) -> None:
        """Write the signatures of one task's (key, document) pairs under the directory `out`."""

    @abstractmethod
    def reduce(self, task_dirs: list[Path], out: Path) -> dict[str, Any]:
        """Decide from every task's signatures; write the decisions under `out`; return a summary."""

    @abstractmethod
    def load(self, out: Path, task: int) -> Any:
        """The decisions (written by `reduce` under `out`) that concern task `task`'s documents."""

    @abstractmethod
    def apply(self, decisions: Any, key: int, doc: Document) -> tuple[Document | None, str, dict[str, Any]]:
        """(doc, "", detail) to keep (maybe rewritten), or (None, reason, detail) to remove."""
