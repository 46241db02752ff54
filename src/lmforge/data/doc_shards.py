"""The writer and reader of the data stage's own document shards (`shard-00000.jsonl.zst`, ...)."""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
import zstandard

from lmforge.data.document import Document
from lmforge.data.files import UNREADABLE, open_binary
from lmforge.io_utils import AtomicFile

SHARD_GLOB = "shard-*.jsonl.zst"


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


def read_documents(where: str | Path, meta: bool = True, meta_key: str | None = None) -> Iterator[Document]:
    """Documents written by ShardWriter, shard by shard in order.

    Our own shards hold only what ShardWriter wrote, so unlike user inputs nothing is quarantined:
    a damaged shard means the data stage's output is broken, and raises ShardReadError.
    meta=False reads id, text and source only (meta left empty), parsed by orjson: what the tokenize
    stage reads while its encoder threads fill the cores, so parsing time is taken from encoding.
    `meta_key` (with meta=False) keeps that one meta value when a document has it, parsed the same
    cheap way: the tokenize stage's language tags need meta["language"] and nothing else.
    """
    for path in shard_paths(where):
        for line_no, raw in _shard_lines(path):
            yield _shard_document(path, line_no, raw, meta, meta_key)


def _shard_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of one shard; a shard cut short or corrupted raises ShardReadError."""
    line_no = 0
    with open_binary(path) as f:
        try:
            for line_no, raw in enumerate(f, 1):
                yield line_no, raw
        except EOFError as e:
            raise ShardReadError(f"{path}: truncated after line {line_no} ({e}); rerun `lmforge data`") from e
        except UNREADABLE as e:
            raise ShardReadError(
                f"{path}: unreadable after line {line_no}: {type(e).__name__}: {e}; rerun `lmforge data`"
            ) from e
    # ShardWriter creates a shard only for a document, so an empty one lost its whole content.
    if line_no == 0:
        raise ShardReadError(f"{path}: truncated: the shard holds no documents; rerun `lmforge data`")


def _shard_document(path: Path, line_no: int, raw: bytes, meta: bool = True, key: str | None = None) -> Document:
    try:
        rec = _parse_record(raw, meta)
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError included
        raise ShardReadError(f"{path}:{line_no}: invalid JSON: {e}") from e
    try:  # the checks only once something is wrong: this runs per document while encoders wait
        return Document(rec["id"], rec["text"], rec["source"],
                        rec.get("meta", {}) if meta else {} if key is None else _one_value(rec, key))
    except (KeyError, TypeError, AttributeError):
        if not isinstance(rec, dict):
            raise ShardReadError(f"{path}:{line_no}: record is a JSON {type(rec).__name__}, not an object") from None
        missing = [k for k in ("id", "text", "source") if k not in rec]
        raise ShardReadError(f"{path}:{line_no}: record lacks {', '.join(map(repr, missing))}") from None


def _one_value(rec: dict[str, Any], key: str) -> dict[str, Any]:
    """{key: rec["meta"][key]} when the record has it, else {}."""
    value = rec.get("meta", {}).get(key)
    return {} if value is None else {key: value}


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
