"""Locating and opening input files: an input's files in a stable order, the root its default ids are
relative to, its format, and a reader that decompresses .gz and .zst transparently (and notices a
truncated file instead of returning its prefix)."""

from __future__ import annotations

import glob
import gzip
import io
import re
from pathlib import Path
from typing import IO, Any

import zstandard

from lmforge.config import InputConfig

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")
# Errors a damaged file raises part-way through reading (truncated gzip, corrupt zstd frame, ...).
UNREADABLE = (OSError, EOFError, zstandard.ZstdError)
_GLOB_MAGIC = re.compile(r"[*?[]")  # what makes a path component a glob pattern


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
