"""Readers for user inputs, and the writer/reader of the data stage's own shards.

Bad input never stops a run and never vanishes: a record that cannot become a Document is a
"read"-step removal with reason "quarantine" and the file and line, so it shows up in the ledger
and in removed.jsonl like any filtered document.

A record without an id gets `[<source label>/]<path relative to the input root>:<line>` (a
one-document text file: the path alone), so same-named files in different folders of one input, or
in inputs with different source labels, get distinct ids.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any, NamedTuple

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from lmforge.config import InputConfig
from lmforge.data.document import Document
from lmforge.data.ledger import Ledger
from lmforge.io_utils import AtomicFile

READ_STEP = "read"
PARQUET_BATCH_ROWS = 1024
# One record larger than this is quarantined unparsed: a runaway line (a whole dump on one line)
# would otherwise be held in memory several times over. `data.max_doc_bytes` overrides it.
MAX_DOC_BYTES = 64 << 20
SHARD_GLOB = "shard-*.jsonl.zst"
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")
# Errors a damaged file raises part-way through reading (truncated gzip, corrupt zstd frame, ...).
_UNREADABLE = (OSError, EOFError, zstandard.ZstdError)
_GLOB_MAGIC = re.compile(r"[*?[]")  # what makes a path component a glob pattern


# ---------------------------------------------------------------- locating and opening files


def input_files(spec: InputConfig) -> list[Path]:
    """The files of one input in a stable order: the file, a directory's files (recursive,
    sorted, dot-files skipped), or a glob's matches (sorted)."""
    path = Path(spec.path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(
            f for f in path.rglob("*")
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)
        )
    else:
        files = sorted(Path(m) for m in glob.glob(spec.path, recursive=True) if Path(m).is_file())
    if not files:
        raise FileNotFoundError(f"input {spec.path!r} matches no files")
    return files


def input_root(spec: InputConfig) -> Path:
    """What default ids are relative to: the directory given, a glob's leading folders without
    wildcards, or a single file's folder."""
    path = Path(spec.path)
    if path.is_file():
        return path.parent
    if path.is_dir():
        return path
    fixed = []
    for part in path.parts:
        if _GLOB_MAGIC.search(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def relative_id(path: Path, root: Path) -> str:
    """`path` relative to `root`, with forward slashes on every platform, so ids do not depend on the OS."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:  # not lexically under root (cannot happen for input_files' own paths): keep it whole
        return path.as_posix()


def _without_compression(name: str) -> str:
    for suffix in _COMPRESSED_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def file_stem(path: Path) -> str:
    """`corpus` for corpus.jsonl, corpus.jsonl.gz and corpus.jsonl.zst alike."""
    return Path(_without_compression(path.name)).stem


def detect_format(path: Path, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    name = _without_compression(path.name).lower()
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


class _ZstdReader(io.RawIOBase):
    """Every frame of a .zst file, raising EOFError if the file ends inside a frame.

    zstandard's own stream_reader returns a truncated file's prefix without any error, which
    would drop the tail of a damaged file silently; it also stops at the first frame by default,
    and `cat a.zst b.zst` or multi-threaded zstd produce several.
    """

    def __init__(self, path: Path, read_size: int = 1 << 17):
        self._file = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._dctx = zstandard.ZstdDecompressor()
        self._dobj = self._dctx.decompressobj()
        self._in_frame = False
        self._read_size = read_size
        self._out = memoryview(b"")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._pos == len(self._out):
            chunk = self._file.read(self._read_size)
            if not chunk:
                if self._in_frame:
                    raise EOFError("zstd data ends inside a frame: the file is truncated")
                return 0
            self._out, self._pos = memoryview(self._decompress(chunk)), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos : self._pos + n]  # a view: one copy, not two
        self._pos += n
        return n

    def _decompress(self, chunk: bytes) -> bytes:
        parts = []
        while chunk:
            self._in_frame = True
            parts.append(self._dobj.decompress(chunk))
            if not self._dobj.eof:
                break
            chunk = self._dobj.unused_data  # the start of the next frame, if any
            self._dobj = self._dctx.decompressobj()
            self._in_frame = False
        return b"".join(parts)

    def close(self) -> None:
        self._file.close()
        super().close()


def open_binary(path: Path) -> IO[bytes]:
    """Open for reading, decompressing .gz and .zst transparently; iterating yields lines."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith((".zst", ".zstd")):
        return io.BufferedReader(_ZstdReader(path), buffer_size=1 << 16)
    return open(path, "rb")


# ---------------------------------------------------------------- reading user inputs


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
    except _UNREADABLE as e:
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
    except (*_UNREADABLE, pa.ArrowException) as e:
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
    except _UNREADABLE as e:
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


# ---------------------------------------------------------------- our own shards


class ShardWriter:
    """Writes `shard-00000.jsonl.zst`, ... with `docs_per_shard` documents each.

    Each shard streams into a hidden temporary file and is renamed into place when complete, so a
    reader never sees a partial shard. Refuses a directory that already holds shards, because
    mixing two runs' shards would silently duplicate or resurrect documents.
    """

    def __init__(self, out_dir: Path, docs_per_shard: int, level: int = 3, prefix: str = ""):
        if docs_per_shard <= 0:
            raise ValueError(f"docs_per_shard must be > 0, got {docs_per_shard}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix  # e.g. the task number, so several writers' shards share a directory in order
        if any(self.out_dir.glob(f"shard-{prefix}*.jsonl.zst")):
            raise FileExistsError(f"{self.out_dir} already holds shards; write to an empty directory")
        self.docs_per_shard = docs_per_shard
        self.paths: list[Path] = []
        self.n_docs = 0
        self._cctx = zstandard.ZstdCompressor(level=level)
        self._out: AtomicFile | None = None
        self._sink: Any = None
        self._in_shard = 0

    def write(self, doc: Document) -> None:
        if self._out is None:
            self._out = AtomicFile(self.out_dir / f"shard-{self.prefix}{len(self.paths):05d}.jsonl.zst")
            self._sink = self._cctx.stream_writer(self._out.file, closefd=False)
        # default=str: parquet meta can hold dates or decimals that JSON has no type for.
        line = json.dumps(doc.to_json(), ensure_ascii=False, default=str) + "\n"
        self._sink.write(line.encode("utf-8"))
        self.n_docs += 1
        self._in_shard += 1
        if self._in_shard == self.docs_per_shard:
            self._commit()

    def _commit(self) -> None:
        assert self._out is not None
        self._sink.close()
        self.paths.append(self._out.commit())
        self._sink = self._out = None
        self._in_shard = 0

    def _abort(self) -> None:
        if self._out is not None:
            self._out.abort()
        self._sink = self._out = None

    def close(self) -> None:
        if self._out is not None:
            self._commit()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()


def shard_paths(where: str | Path) -> list[Path]:
    """Shards of a directory (in order), a single shard file, or a glob's matches (sorted)."""
    path = Path(where)
    if path.is_dir():
        return sorted(path.glob(SHARD_GLOB))
    if path.is_file():
        return [path]
    matches = sorted(Path(m) for m in glob.glob(str(where), recursive=True) if Path(m).is_file())
    if not matches:
        raise FileNotFoundError(f"no shards at {str(where)!r}")
    return matches


class ShardReadError(ValueError):
    """A document shard of the data stage cannot be read back; the message names the file, and the
    line when one line is at fault."""


def read_documents(where: str | Path, meta: bool = True) -> Iterator[Document]:
    """Documents written by ShardWriter, shard by shard in order.

    Our own shards hold only what ShardWriter wrote, so unlike user inputs nothing is quarantined:
    a damaged shard means the data stage's output is broken, and raises ShardReadError.
    meta=False reads id, text and source only (meta left empty), parsed by orjson: what the tokenize
    stage reads while its encoder threads fill the cores, so parsing time is taken from encoding.
    """
    for path in shard_paths(where):
        for line_no, raw in _shard_lines(path):
            yield _shard_document(path, line_no, raw, meta)


def _shard_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of one shard; a shard cut short or corrupted raises ShardReadError."""
    line_no = 0
    with open_binary(path) as f:
        try:
            for line_no, raw in enumerate(f, 1):
                yield line_no, raw
        except EOFError as e:
            raise ShardReadError(f"{path}: truncated after line {line_no} ({e}); rerun `lmforge data`") from e
        except _UNREADABLE as e:
            raise ShardReadError(
                f"{path}: unreadable after line {line_no}: {type(e).__name__}: {e}; rerun `lmforge data`"
            ) from e
    # ShardWriter creates a shard only for a document, so an empty one lost its whole content.
    if line_no == 0:
        raise ShardReadError(f"{path}: truncated: the shard holds no documents; rerun `lmforge data`")


def _shard_document(path: Path, line_no: int, raw: bytes, meta: bool = True) -> Document:
    try:
        rec = _parse_record(raw, meta)
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError included
        raise ShardReadError(f"{path}:{line_no}: invalid JSON: {e}") from e
    try:  # the checks only once something is wrong: this runs per document while encoders wait
        return Document(rec["id"], rec["text"], rec["source"], rec.get("meta", {}) if meta else {})
    except (KeyError, TypeError, AttributeError):
        if not isinstance(rec, dict):
            raise ShardReadError(f"{path}:{line_no}: record is a JSON {type(rec).__name__}, not an object") from None
        missing = [k for k in ("id", "text", "source") if k not in rec]
        raise ShardReadError(f"{path}:{line_no}: record lacks {', '.join(map(repr, missing))}") from None


def _parse_record(raw: bytes, meta: bool) -> Any:
    """json.loads, exact for everything json wrote; without meta, orjson (~2x faster) first. orjson
    refuses the NaN / Infinity json writes for non-finite floats and reads integers past 64 bits as
    floats: both can only be in meta, which is then dropped, or make it fall back to json."""
    if not meta:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(raw)
