"""Readers for user inputs.

Bad input never stops a run and never vanishes: a record that cannot become a Document is a
"read"-step removal with reason "quarantine" and the file and line, so it shows up in the ledger
and in removed.jsonl like any filtered document.

A record without an id gets `[<source label>/]<path relative to the input root>:<line>` (a
one-document text file: the path alone), so same-named files in different folders of one input, or
in inputs with different source labels, get distinct ids.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from lmforge.config import InputConfig
from lmforge.data.document import Document
from lmforge.data.files import (
    UNREADABLE,
    detect_format,
    file_stem,
    input_files,
    input_root,
    open_binary,
    relative_id,
)
from lmforge.data.ledger import Ledger

READ_STEP = "read"
PARQUET_BATCH_ROWS = 1024
# One record larger than this is quarantined unparsed: a runaway line (a whole dump on one line)
# would otherwise be held in memory several times over. `data.max_doc_bytes` overrides it.
MAX_DOC_BYTES = 64 << 20


class ReadDoc(NamedTuple):
    """A document with where it came from (file and line are None for a built-in document; line is
    None for a one-document text file)."""

    doc: Document
    file: Path | None
    line: int | None


def read_input(spec: InputConfig, ledger: Ledger, max_doc_bytes: int = MAX_DOC_BYTES) -> Iterator[ReadDoc]:
    """Documents of one input with their file and line, NOT yet counted in the ledger: the caller
    counts each one with `count_read` or removes it. Quarantined records are fully accounted here."""
    root = input_root(spec)
    for path in input_files(spec):
        yield from read_file(spec, path, root, ledger, max_doc_bytes)


def read_file(spec: InputConfig, path: Path, root: Path, ledger: Ledger,
              max_doc_bytes: int = MAX_DOC_BYTES) -> Iterator[ReadDoc]:
    """One file of an input (see read_input)."""
    rel = relative_id(path, root)
    if spec.source:  # inputs labelled apart (web/data.jsonl, books/data.jsonl) must not share ids
        rel = f"{spec.source}/{rel}"
    fmt = detect_format(path, spec.format)
    if fmt == "jsonl":
        yield from _read_jsonl(path, rel, spec, ledger, max_doc_bytes)
    elif fmt == "parquet":
        yield from _read_parquet(path, rel, spec, ledger)
    else:
        yield from _read_text(path, rel, spec, ledger, max_doc_bytes)


def iter_input(spec: InputConfig, ledger: Ledger) -> Iterator[Document]:
    """Documents of one input, accounting every record under the ledger's "read" step."""
    for read in read_input(spec, ledger):
        yield count_read(ledger, read.doc)


def count_read(ledger: Ledger, doc: Document) -> Document:
    """Account a successfully read document under the "read" step."""
    n = doc.n_bytes
    ledger.count_in(READ_STEP, doc.source, n)
    ledger.count_kept(READ_STEP, doc.source, n)
    return doc


def _quarantine(
    ledger: Ledger, doc_id: str, source: str, path: Path, line: int | None, problem: str, n_bytes: int
) -> None:
    ledger.count_in(READ_STEP, source, n_bytes)
    detail = {"file": str(path), "line": line, "problem": problem}
    ledger.record_removed(doc_id, READ_STEP, "quarantine", detail, source=source, n_bytes=n_bytes)


def _record_to_doc(rec: Any, spec: InputConfig, default_id: str, stem: str) -> Document | tuple[str, str, str]:
    """A Document, or (id, source, problem) for a record that cannot become one."""
    if not isinstance(rec, dict):
        return default_id, spec.source or stem, f"record is a JSON {type(rec).__name__}, not an object"
    raw_id, rec_source = rec.get(spec.id_key), rec.get("source")
    doc_id = default_id if raw_id is None else str(raw_id)
    use_rec_source = spec.source is None and isinstance(rec_source, str) and rec_source != ""
    source = spec.source or (rec_source if use_rec_source else stem)
    text = rec.get(spec.text_key)
    if not isinstance(text, str):
        return doc_id, source, f"no string {spec.text_key!r} field (got {type(text).__name__})"
    problem = text_problem(text)
    if problem:
        return doc_id, source, problem
    # The record's own `source` stays in meta when something else labelled the document.
    skip = {spec.text_key, spec.id_key} | ({"source"} if use_rec_source else set())
    meta = {k: v for k, v in rec.items() if k not in skip}
    return Document(id=doc_id, text=text, source=source, meta=meta)


def text_problem(text: str) -> str:
    """Why a decoded text cannot be a document ("" if it can): JSON's \\u escapes can smuggle in a lone
    surrogate (not encodable as UTF-8, so every later stage would crash on it) or NUL bytes."""
    if "\x00" in text:
        return "text holds NUL bytes"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"text is not valid Unicode: lone surrogate {text[e.start]!r} at character {e.start}"
    return ""


# The two generators below turn a damaged file into a final (position, problem) item instead of an
# exception, so the except clause covers only the file reading, not the ledger writes of the caller.


def _jsonl_lines(path: Path) -> Iterator[tuple[int, bytes | str]]:
    """(line number, raw line) for non-blank lines; a damaged file ends with (line, problem)."""
    line_no = 0
    try:
        with open_binary(path) as f:
            for line_no, raw in enumerate(f, 1):
                if raw.strip():
                    yield line_no, raw
    except UNREADABLE as e:
        yield line_no + 1, f"unreadable from this line on: {type(e).__name__}: {e}"


def _parquet_rows(path: Path, text_key: str) -> Iterator[tuple[int | None, dict[str, Any] | str]]:
    """(1-based row number, row) in batches; problems as in `_jsonl_lines` (None: the whole file)."""
    row = 0
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if text_key not in names:
            yield None, f"no column {text_key!r}; columns: {', '.join(names)}"
            return
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for rec in batch.to_pylist():
                row += 1
                yield row, rec
    except (*UNREADABLE, pa.ArrowException) as e:
        yield row + 1, f"unreadable parquet from this row on: {type(e).__name__}: {e}"


def _read_jsonl(path: Path, rel: str, spec: InputConfig, ledger: Ledger, max_doc_bytes: int) -> Iterator[ReadDoc]:
    stem = file_stem(path)
    for line_no, raw in _jsonl_lines(path):
        default_id = f"{rel}:{line_no}"
        if isinstance(raw, str):
            _quarantine(ledger, default_id, spec.source or stem, path, line_no, raw, 0)
            continue
        if len(raw) > max_doc_bytes:
            problem = f"record of {len(raw):,} bytes exceeds data.max_doc_bytes={max_doc_bytes:,}"
            _quarantine(ledger, default_id, spec.source or stem, path, line_no, problem, len(raw))
            continue
        try:
            rec = json.loads(raw)
        except ValueError as e:  # UnicodeDecodeError included: the line is not UTF-8
            _quarantine(ledger, default_id, spec.source or stem, path, line_no, f"invalid JSON: {e}", len(raw))
            continue
        doc = _record_to_doc(rec, spec, default_id, stem)
        if isinstance(doc, Document):
            yield ReadDoc(doc, path, line_no)
        else:
            _quarantine(ledger, doc[0], doc[1], path, line_no, doc[2], len(raw))


def _read_parquet(path: Path, rel: str, spec: InputConfig, ledger: Ledger) -> Iterator[ReadDoc]:
    """A row's "line" in the ledger is its 1-based row number."""
    stem = file_stem(path)
    for row, rec in _parquet_rows(path, spec.text_key):
        default_id = rel if row is None else f"{rel}:{row}"
        if isinstance(rec, str):
            _quarantine(ledger, default_id, spec.source or stem, path, row, rec, 0)
            continue
        doc = _record_to_doc(rec, spec, default_id, stem)
        if isinstance(doc, Document):
            yield ReadDoc(doc, path, row)
        else:
            _quarantine(ledger, doc[0], doc[1], path, row, doc[2], 0)


def _read_text(path: Path, doc_id: str, spec: InputConfig, ledger: Ledger, max_doc_bytes: int) -> Iterator[ReadDoc]:
    """One document per file."""
    source = spec.source or file_stem(path)
    size = path.stat().st_size
    if size > max_doc_bytes:  # checked before reading, so a huge file is never loaded
        problem = f"file of {size:,} bytes exceeds data.max_doc_bytes={max_doc_bytes:,}"
        _quarantine(ledger, doc_id, source, path, None, problem, size)
        return
    try:
        with open_binary(path) as f:
            data = f.read()
    except UNREADABLE as e:
        _quarantine(ledger, doc_id, source, path, None, f"unreadable: {type(e).__name__}: {e}", 0)
        return
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        _quarantine(ledger, doc_id, source, path, None, f"not UTF-8 text: {e}", len(data))
        return
    if "\x00" in text:
        _quarantine(ledger, doc_id, source, path, None, "text holds NUL bytes", len(data))
        return
    yield ReadDoc(Document(id=doc_id, text=text, source=source), path, None)
