"""Stage 1 driver: inputs -> steps (filters, dedup) -> train/val shards + ledger.

Steps compose lazily as generators, so documents stream through in constant memory (apart from
the id and dedup hash sets). The pipeline, not the steps, counts what enters and leaves each
step; a step that loses a document without telling the ledger fails `Ledger.check()`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import xxhash
from tqdm import tqdm

from lmforge.config import ConfigError, DataConfig
from lmforge.data.builtin import iter_builtin_corpus
from lmforge.data.dedup import ExactDedup
from lmforge.data.document import Document
from lmforge.data.filters import build_filter
from lmforge.data.io import READ_STEP, ReadDoc, ShardWriter, count_read, input_files, read_input
from lmforge.data.ledger import Ledger
from lmforge.io_utils import atomic_path, atomic_write_json


class DataStageError(RuntimeError):
    """The data stage cannot produce usable output (e.g. too few documents survive to split)."""


class Step(Protocol):
    """Takes documents, yields the kept ones, and reports each removal to the ledger."""

    name: str

    def __call__(self, docs: Iterable[Document], ledger: Ledger) -> Iterator[Document]: ...


def build_steps(cfg: DataConfig) -> list[Step]:
    """All steps in order, validated; repeated names get "#2", "#3" so ledger rows stay distinct."""
    steps: list[Step] = [build_filter(spec, i) for i, spec in enumerate(cfg.filters)]
    if cfg.dedup == "exact":
        steps.append(ExactDedup())
    seen: dict[str, int] = {READ_STEP: 1}
    for step in steps:
        seen[step.name] = seen.get(step.name, 0) + 1
        if seen[step.name] > 1:
            step.name = f"{step.name}#{seen[step.name]}"
    return steps


def run_step(step: Step, docs: Iterable[Document], ledger: Ledger) -> Iterator[Document]:
    """`step` over `docs`, counting each document in and each one out under the step's name."""

    def counted_in() -> Iterator[Document]:
        for doc in docs:
            ledger.count_in(step.name, doc.source, doc.n_bytes)
            yield doc

    for doc in step(counted_in(), ledger):
        ledger.count_kept(step.name, doc.source, doc.n_bytes)
        yield doc


class SeenIds:
    """Document ids seen so far in a run, each held as a 128-bit xxh3 digest.

    The split and removed.jsonl are keyed by id, so a second document with the same id would be
    routed or reported as the first. Digests keep memory per document small and fixed whatever the
    id length; at 128 bits a false match is negligible even over billions of documents.
    """

    def __init__(self) -> None:
        self._first: dict[int, int] = {}  # digest -> index into _sources (small ints, shared objects)
        self._sources: list[str] = []
        self._source_index: dict[str, int] = {}

    def first_source(self, doc: Document) -> str | None:
        """None when `doc.id` is new (and remembers it); else the source it was first seen under."""
        digest = xxhash.xxh3_128_intdigest(doc.id.encode("utf-8"))
        first = self._first.get(digest)
        if first is not None:
            return self._sources[first]
        index = self._source_index.setdefault(doc.source, len(self._sources))
        if index == len(self._sources):
            self._sources.append(doc.source)
        self._first[digest] = index
        return None


def read_inputs(cfg: DataConfig, ledger: Ledger) -> Iterator[Document]:
    """User inputs in recipe order, or the built-in corpus when there are none; a repeated id is a
    "read"-step removal with reason "duplicate_id"."""
    seen = SeenIds()
    for read in _read_all(cfg, ledger):
        first_source = seen.first_source(read.doc)
        if first_source is None:
            yield count_read(ledger, read.doc)
        else:
            _remove_duplicate_id(ledger, read, first_source)


def _read_all(cfg: DataConfig, ledger: Ledger) -> Iterator[ReadDoc]:
    if cfg.inputs:
        for spec in cfg.inputs:
            yield from read_input(spec, ledger)
        return
    for doc in iter_builtin_corpus(cfg.builtin):
        yield ReadDoc(doc, None, None)


def _remove_duplicate_id(ledger: Ledger, read: ReadDoc, first_source: str) -> None:
    doc = read.doc
    detail: dict[str, Any] = {}
    if read.file is not None:
        detail["file"] = str(read.file)
    if read.line is not None:
        detail["line"] = read.line
    detail["first_source"] = first_source
    ledger.count_in(READ_STEP, doc.source, doc.n_bytes)
    ledger.record_removed(doc, READ_STEP, "duplicate_id", detail)


def split_key(doc_id: str, seed: int) -> float:
    """Uniform in [0, 1); a document goes to val when below val_fraction.

    Depends only on the id and seed, so membership is stable across reruns, filter changes and
    worker counts.
    """
    return xxhash.xxh64_intdigest(doc_id.encode("utf-8"), seed=seed) / 2**64


class _Splitter:
    """Routes documents to train/val shards by `split_key`, guaranteeing both splits are non-empty.

    The train document with the lowest key (the most val-like) is held back, and likewise the val
    document with the highest key; at the end each goes to its own split unless the other split is
    empty, which a small corpus or a tiny val_fraction can otherwise produce. Shards keep stream
    order apart from these two documents, which are written last.
    """

    def __init__(self, train: ShardWriter, val: ShardWriter, seed: int, val_fraction: float):
        self.writers = {"train": train, "val": val}
        self.seed, self.val_fraction = seed, val_fraction
        self.held: dict[str, tuple[float, Document] | None] = {"train": None, "val": None}
        self.per_source: dict[str, dict[str, int]] = {}

    def add(self, doc: Document) -> None:
        key = split_key(doc.id, self.seed)
        split = "val" if key < self.val_fraction else "train"
        held = self.held[split]
        # Hold the candidate most likely to be moved: lowest key in train, highest key in val.
        if held is None or (key < held[0] if split == "train" else key > held[0]):
            self.held[split] = (key, doc)
            if held is not None:
                self._write(split, held[1])
        else:
            self._write(split, doc)

    def finish(self) -> None:
        train, val = self.held["train"], self.held["val"]
        if train is not None and val is not None:
            self._write("train", train[1])
            self._write("val", val[1])
            return
        held = train or val
        if held is None:
            raise DataStageError("no documents survived the data stage; loosen data.filters or add inputs")
        if sum(self.counts().values()) == 0:
            raise DataStageError(
                f"only one document ({held[1].id!r}) survived the data stage; a train/val split needs at "
                "least two: loosen data.filters or add inputs"
            )
        # One split is empty: the held document of the other is the one nearest to it; move it there.
        self._write("val" if held is train else "train", held[1])

    def counts(self) -> dict[str, int]:
        return {split: w.n_docs for split, w in self.writers.items()}

    def _write(self, split: str, doc: Document) -> None:
        self.writers[split].write(doc)
        row = self.per_source.setdefault(doc.source, {"train_docs": 0, "val_docs": 0})
        row[f"{split}_docs"] += 1


def run_data_stage(cfg: DataConfig, out_dir: Path, seed: int, progress: bool = True) -> dict[str, Any]:
    """Run stage 1 into `out_dir`: train/ and val/ shards, removed.jsonl and ledger.json.

    `out_dir` belongs to the stage and is replaced as a whole: everything is built in a temporary
    sibling directory that takes its place only when the stage succeeds. Swapping the files one by
    one could leave a new val/ beside an old train/ after a crash, leaking documents across splits;
    a failed run leaves the previous outputs untouched.
    """
    steps = build_steps(cfg)  # a bad recipe fails here, before any data is read
    for i, spec in enumerate(cfg.inputs):
        try:
            input_files(spec)
        except FileNotFoundError as e:
            raise ConfigError(f"data.inputs[{i}].path: {e}") from e
    with atomic_path(Path(out_dir)) as tmp:
        tmp.mkdir()
        ledger, split, ledger_json = _build_outputs(cfg, steps, tmp, seed, progress)
    totals = ledger.totals()
    table = ledger.summary_table() + f"\nsplit (seed {seed}): {split['train']} train, {split['val']} val"
    return {
        "docs_in": totals["docs_in"],
        "docs_kept": totals["docs_kept"],
        "docs_removed": totals["docs_removed"],
        "train_docs": split["train"],
        "val_docs": split["val"],
        "bytes_kept": totals["bytes_kept"],
        "per_source": ledger_json["per_source"],
        "ledger": ledger_json,
        "table": table,
    }


def _build_outputs(
    cfg: DataConfig, steps: list[Step], out_dir: Path, seed: int, progress: bool
) -> tuple[Ledger, dict[str, int], dict[str, Any]]:
    """Write all of the stage's outputs into the fresh directory `out_dir`; returns the closed
    ledger, the split counts and ledger.json's content."""
    with Ledger(out_dir / "removed.jsonl", steps=[READ_STEP] + [s.name for s in steps]) as ledger:
        with (
            ShardWriter(out_dir / "train", cfg.docs_per_shard) as tw,
            ShardWriter(out_dir / "val", cfg.docs_per_shard) as vw,
        ):
            splitter = _Splitter(tw, vw, seed, cfg.val_fraction)
            # The bar counts documents read, the one total that relates to the input's size.
            docs: Iterable[Document] = tqdm(read_inputs(cfg, ledger), desc="data", unit="doc", disable=not progress)
            for step in steps:
                docs = run_step(step, docs, ledger)
            for doc in docs:
                splitter.add(doc)
            splitter.finish()
        ledger.check()
    split = splitter.counts()
    ledger_json = ledger.to_json()
    for source, row in ledger_json["per_source"].items():
        row.update(splitter.per_source.get(source, {"train_docs": 0, "val_docs": 0}))
    ledger_json["split"] = {"seed": seed, "val_fraction": cfg.val_fraction, **split}
    atomic_write_json(out_dir / "ledger.json", ledger_json)
    return ledger, split, ledger_json
