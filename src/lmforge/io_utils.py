"""Atomic writes: every artifact is written to a temporary name and renamed into place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

# Large streamed files start the disk write of what they hold every this many bytes, so the fsync at
# commit waits for the last stretch only, not the whole file (it is often on a run's critical path).
WRITEBACK_BYTES = 1 << 20


class AtomicFile:
    """A file streamed under a hidden temporary sibling name: `commit()` fsyncs it and renames it
    into place, `abort()` deletes it. For writers that keep a file open across many calls."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self.tmp = Path(tmp)
        self.file: BinaryIO = os.fdopen(fd, "wb")
        self._synced = self._written = 0  # bytes whose writeback has started, bytes written

    def write(self, data: Any) -> None:
        """Append `data` (bytes or any contiguous buffer); past WRITEBACK_BYTES, start writing it out."""
        self.file.write(data)
        self._written += memoryview(data).nbytes
        if self._written - self._synced >= WRITEBACK_BYTES and hasattr(os, "posix_fadvise"):
            self.file.flush()
            # On Linux DONTNEED starts the writeback of the range's dirty pages without waiting for
            # it: sync_file_range, which Python lacks. Only the new range, or each call would walk
            # the whole file's pages.
            os.posix_fadvise(self.file.fileno(), self._synced, self._written - self._synced, os.POSIX_FADV_DONTNEED)
            self._synced = self._written

    def commit(self) -> Path:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    out = AtomicFile(path)
    try:
        out.file.write(data)
        out.commit()
    except BaseException:
        out.abort()
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write (file or directory); rename it to `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    _remove(tmp)
    try:
        yield tmp
        if path.exists() and path.is_dir() and tmp.is_dir():
            # Two renames: directories cannot be swapped in one. Put the old one back if the second fails.
            old = path.parent / f".{path.name}.old{os.getpid()}"
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()
