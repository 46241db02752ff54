"""Token shards: documents -> one flat memory-mapped token stream with document boundaries kept.

Per shard `{name}-NNNNN`:
  .bin   tokens, uint16 or uint32, every document followed by EOS
  .idx   header (magic, version, n_docs), then document start offsets uint64[n+1] (the last one is
         the shard's token count), source ids uint16[n], zero padding to 8 bytes, document UTF-8
         byte lengths uint64[n] (for bits-per-byte)
  .json  manifest: tokenizer sha256, dtype, counts, sources, xxh64 checksums
Each file is written to a temporary name and renamed; the manifest is written last, so a shard
whose manifest exists is complete.
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import xxhash
from tokenizers import Tokenizer
from tqdm import tqdm

from lmforge.data.document import Document
from lmforge.io_utils import atomic_write_bytes, atomic_write_json
from lmforge.tokenizer.special_tokens import EOS_ID, check_special_tokens
from lmforge.tokenizer.train import tokenizer_hash

INDEX_MAGIC = b"LMFIDX\x00\x00"
INDEX_VERSION = 1
_HEADER = struct.Struct("<8sIIQ")  # magic, version, reserved, n_docs
MANIFEST_FORMAT = "lmforge-token-shard"
_ENCODE_BATCH_DOCS = 1024
_FLUSH_TOKENS = 1 << 22  # buffer this many tokens before a write, to keep syscalls few
_HASH_BLOCK = 1 << 24


class ShardError(ValueError):
    """A shard on disk is missing, truncated, corrupted or inconsistent; the message names the file."""


def choose_dtype(vocab_size: int, dtype: str = "auto") -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32; an explicit choice is checked."""
    if dtype == "auto":
        dtype = "uint16" if vocab_size <= 2**16 else "uint32"
    if dtype not in ("uint16", "uint32"):
        raise ValueError(f"tokens.dtype: {dtype!r} is not one of 'auto', 'uint16', 'uint32'")
    if vocab_size > np.iinfo(dtype).max + 1:
        raise ValueError(f"tokens.dtype: {dtype} cannot hold ids of a {vocab_size}-token vocabulary")
    return np.dtype(dtype)


def shard_stem(name: str, index: int) -> str:
    return f"{name}-{index:05d}"


def _shard_pattern(name: str) -> re.Pattern[str]:
    return re.compile(re.escape(name) + r"-(\d{5})\.(bin|idx|json)")


def _index_layout(n_docs: int) -> tuple[int, int, int, int]:
    """Byte offsets of (offsets, source ids, doc bytes) in a .idx file and its total size."""
    off_at = _HEADER.size
    src_at = off_at + 8 * (n_docs + 1)
    bytes_at = src_at + -(-2 * n_docs // 8) * 8  # source ids padded so the uint64 array is aligned
    return off_at, src_at, bytes_at, bytes_at + 8 * n_docs


def _xxh64_file(path: Path) -> str:
    digest = xxhash.xxh64()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- writing


class ShardWriter:
    """Append documents' token ids; shards roll over at `max_shard_tokens`.

    Use as a context manager: on a clean exit the last shard is finished and `summary` is set; on an
    exception the unfinished shard's temporary file is removed. A document is never split across
    shards, so a single document longer than `max_shard_tokens` gets an oversized shard of its own.
    """

    def __init__(
        self,
        out_dir: Path,
        name: str,
        tokenizer_sha256: str,
        vocab_size: int,
        dtype: str = "auto",
        max_shard_tokens: int = 2**31,
    ):
        if max_shard_tokens < 1:
            raise ValueError(f"max_shard_tokens must be >= 1, got {max_shard_tokens}")
        self.out_dir = Path(out_dir)
        self.name = name
        self.tokenizer_sha256 = tokenizer_sha256
        self.vocab_size = vocab_size
        self.dtype = choose_dtype(vocab_size, dtype)
        self.max_shard_tokens = max_shard_tokens
        self.summary: dict[str, Any] | None = None
        self._n_shards = 0
        self._totals: dict[str, dict[str, int]] = {}
        self._file: BinaryIO | None = None

    def __enter__(self) -> ShardWriter:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Old shards of this name would otherwise mix with the new ones in TokenDataset.
        pattern = _shard_pattern(self.name)
        for p in self.out_dir.iterdir():
            if pattern.fullmatch(p.name):
                p.unlink()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            if self._file is not None:
                self._file.close()
                self._tmp.unlink(missing_ok=True)
            return
        if self._file is not None or self._n_shards == 0:
            self._finish_shard()  # with no documents at all, an empty shard keeps the set openable
        self.summary = self._summary()

    def add(self, ids: np.ndarray | list[int], source: str, n_bytes: int) -> None:
        """One document's token ids (without EOS; it is appended here) and its UTF-8 length."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size}) in a document of {source!r}")
        n = ids.size + 1
        if self._file is not None and self._shard_tokens + n > self.max_shard_tokens:
            self._finish_shard()
        if self._file is None:
            self._start_shard()
        source_id = self._sources.setdefault(source, len(self._sources))
        if source_id >= 2**16:
            raise ValueError("more than 65536 sources in one shard")
        self._buffer.append(ids.astype(self.dtype, copy=False))
        self._buffer.append(np.array([EOS_ID], dtype=self.dtype))
        self._buffered += n
        self._shard_tokens += n
        self._starts.append(self._shard_tokens)
        self._source_ids.append(source_id)
        self._doc_bytes.append(n_bytes)
        stats = self._per_source.setdefault(source, {"docs": 0, "tokens": 0, "bytes": 0})
        stats["docs"] += 1
        stats["tokens"] += n
        stats["bytes"] += n_bytes
        if self._buffered >= _FLUSH_TOKENS:
            self._flush()

    def _start_shard(self) -> None:
        self._stem = shard_stem(self.name, self._n_shards)
        self._tmp = self.out_dir / f".{self._stem}.bin.tmp{os.getpid()}"
        self._file = open(self._tmp, "wb")  # noqa: SIM115 -- stays open across add() calls
        self._hash = xxhash.xxh64()
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._shard_tokens = 0
        self._starts = [0]
        self._source_ids: list[int] = []
        self._doc_bytes: list[int] = []
        self._sources: dict[str, int] = {}
        self._per_source: dict[str, dict[str, int]] = {}

    def _flush(self) -> None:
        assert self._file is not None
        if self._buffer:
            data = np.concatenate(self._buffer).tobytes()
            self._file.write(data)
            self._hash.update(data)
        self._buffer = []
        self._buffered = 0

    def _finish_shard(self) -> None:
        if self._file is None:
            self._start_shard()
        assert self._file is not None
        self._flush()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self._tmp, self.out_dir / f"{self._stem}.bin")

        n_docs = len(self._source_ids)
        _, src_at, bytes_at, size = _index_layout(n_docs)
        index = bytearray(size)
        _HEADER.pack_into(index, 0, INDEX_MAGIC, INDEX_VERSION, 0, n_docs)
        index[_HEADER.size : src_at] = np.asarray(self._starts, dtype="<u8").tobytes()
        index[src_at : src_at + 2 * n_docs] = np.asarray(self._source_ids, dtype="<u2").tobytes()
        index[bytes_at:] = np.asarray(self._doc_bytes, dtype="<u8").tobytes()
        atomic_write_bytes(self.out_dir / f"{self._stem}.idx", bytes(index))

        manifest = {
            "format": MANIFEST_FORMAT,
            "version": INDEX_VERSION,
            "name": self.name,
            "shard": self._n_shards,
            "tokenizer_sha256": self.tokenizer_sha256,
            "vocab_size": self.vocab_size,
            "dtype": self.dtype.name,
            "n_tokens": self._shard_tokens,
            "n_docs": n_docs,
            "n_bytes": sum(self._doc_bytes),
            "source_names": list(self._sources),
            "sources": self._per_source,
            "bin_xxh64": self._hash.hexdigest(),
            "idx_xxh64": xxhash.xxh64(bytes(index)).hexdigest(),
        }
        atomic_write_json(self.out_dir / f"{self._stem}.json", manifest)
        for source, stats in self._per_source.items():
            total = self._totals.setdefault(source, {"docs": 0, "tokens": 0, "bytes": 0})
            for key, value in stats.items():
                total[key] += value
        self._n_shards += 1

    def _summary(self) -> dict[str, Any]:
        sources = {s: {**t, "bytes_per_token": _bytes_per_token(t)} for s, t in self._totals.items()}
        totals = {k: sum(t[k] for t in self._totals.values()) for k in ("docs", "tokens", "bytes")}
        return {
            "name": self.name,
            "dir": str(self.out_dir),
            "n_shards": self._n_shards,
            "n_docs": totals["docs"],
            "n_tokens": totals["tokens"],
            "n_bytes": totals["bytes"],
            "bytes_per_token": _bytes_per_token(totals),
            "dtype": self.dtype.name,
            "tokenizer_sha256": self.tokenizer_sha256,
            "sources": sources,
        }


def _bytes_per_token(stats: dict[str, int]) -> float:
    # Text tokens only: the EOS separators carry no bytes and would flatter short documents.
    text_tokens = stats["tokens"] - stats["docs"]
    return stats["bytes"] / text_tokens if text_tokens > 0 else 0.0


def write_token_shards(
    docs: Iterable[Document],
    tokenizer: Tokenizer,
    tokenizer_path: Path,
    out_dir: Path,
    name: str,
    dtype: str = "auto",
    max_shard_tokens: int = 2**31,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize `docs` into `out_dir/{name}-NNNNN.{bin,idx,json}`; return totals and per-source stats."""
    check_special_tokens(tokenizer, where=str(tokenizer_path))
    writer = ShardWriter(
        out_dir, name, tokenizer_hash(tokenizer_path), tokenizer.get_vocab_size(), dtype, max_shard_tokens
    )
    # A document quoting "<|endoftext|>" must not produce a real EOS, or it would split in two.
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        with writer, tqdm(desc=f"tokenize {name}", unit="doc", disable=not progress) as bar:
            for batch in _batches(docs, _ENCODE_BATCH_DOCS):
                encodings = tokenizer.encode_batch([d.text for d in batch], add_special_tokens=False)
                for doc, enc in zip(batch, encodings, strict=True):
                    writer.add(enc.ids, doc.source, doc.n_bytes)
                bar.update(len(batch))
    finally:
        tokenizer.encode_special_tokens = previous
    assert writer.summary is not None
    return writer.summary


def _batches(docs: Iterable[Document], size: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------- reading


class _Shard:
    """One shard opened and checked against its manifest."""

    def __init__(self, stem: Path):
        self.bin_path = stem.with_name(stem.name + ".bin")
        self.idx_path = stem.with_name(stem.name + ".idx")
        json_path = stem.with_name(stem.name + ".json")
        for p in (json_path, self.bin_path, self.idx_path):
            if not p.is_file():
                raise ShardError(f"{p}: missing; the shard set is incomplete, re-run tokenization")
        try:
            self.manifest: dict[str, Any] = json.loads(json_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ShardError(f"{json_path}: manifest is not valid JSON: {e}") from e
        m = self.manifest
        if m.get("format") != MANIFEST_FORMAT or m.get("version") != INDEX_VERSION:
            raise ShardError(
                f"{json_path}: not a version {INDEX_VERSION} {MANIFEST_FORMAT} manifest "
                f"(format={m.get('format')!r}, version={m.get('version')!r})"
            )
        self.dtype = np.dtype(m["dtype"])
        self.n_tokens = int(m["n_tokens"])
        self.n_docs = int(m["n_docs"])

        expected = self.n_tokens * self.dtype.itemsize
        actual = self.bin_path.stat().st_size
        if actual != expected:
            raise ShardError(
                f"{self.bin_path}: {actual} bytes, but the manifest says {self.n_tokens} {self.dtype.name} "
                f"tokens ({expected} bytes); the file is truncated or corrupted"
            )
        self._read_index()
        # np.memmap cannot map an empty file.
        self.tokens = (
            np.memmap(self.bin_path, dtype=self.dtype, mode="r") if self.n_tokens else np.zeros(0, dtype=self.dtype)
        )

    def _read_index(self) -> None:
        data = self.idx_path.read_bytes()
        off_at, src_at, bytes_at, size = _index_layout(self.n_docs)
        if len(data) != size:
            raise ShardError(
                f"{self.idx_path}: {len(data)} bytes, expected {size} for {self.n_docs} documents; "
                "the file is truncated or corrupted"
            )
        magic, version, _, n_docs = _HEADER.unpack_from(data)
        if magic != INDEX_MAGIC or version != INDEX_VERSION or n_docs != self.n_docs:
            raise ShardError(f"{self.idx_path}: bad header (magic {magic!r}, version {version}, {n_docs} docs)")
        n = self.n_docs
        self.offsets = np.frombuffer(data, "<u8", n + 1, off_at).astype(np.int64)
        self.source_ids = np.frombuffer(data, "<u2", n, src_at).astype(np.int64)
        self.doc_bytes = np.frombuffer(data, "<u8", n, bytes_at).astype(np.int64)
        # Every document holds at least its EOS, so starts strictly increase.
        if self.offsets[0] != 0 or self.offsets[-1] != self.n_tokens or np.any(np.diff(self.offsets) <= 0):
            raise ShardError(f"{self.idx_path}: document offsets are inconsistent with {self.n_tokens} tokens")
        if n and self.source_ids.max() >= len(self.manifest["source_names"]):
            raise ShardError(f"{self.idx_path}: source id beyond the manifest's source_names")

    def verify(self) -> None:
        for path, key in ((self.bin_path, "bin_xxh64"), (self.idx_path, "idx_xxh64")):
            got = _xxh64_file(path)
            if got != self.manifest[key]:
                raise ShardError(f"{path}: xxh64 {got} does not match the manifest's {self.manifest[key]}")


class TokenDataset:
    """All shards `{name}-NNNNN` in `out_dir`, presented as one concatenated token stream."""

    def __init__(self, out_dir: Path, name: str):
        self.out_dir = Path(out_dir)
        self.name = name
        if not self.out_dir.is_dir():
            raise FileNotFoundError(f"token shard directory not found: {self.out_dir}")
        pattern = _shard_pattern(name)
        indices = sorted({int(m.group(1)) for p in self.out_dir.iterdir() if (m := pattern.fullmatch(p.name))})
        if not indices:
            raise FileNotFoundError(f"no token shards {name}-NNNNN.bin in {self.out_dir}")
        if indices != list(range(len(indices))):
            missing = sorted(set(range(indices[-1] + 1)) - set(indices))
            raise ShardError(f"{self.out_dir / shard_stem(name, missing[0])}.bin: missing; shards are not contiguous")
        self.shards = [_Shard(self.out_dir / shard_stem(name, i)) for i in indices]

        first = self.shards[0]
        for shard in self.shards[1:]:
            for key in ("tokenizer_sha256", "dtype"):
                if shard.manifest[key] != first.manifest[key]:
                    raise ShardError(
                        f"{shard.bin_path}: {key} {shard.manifest[key]!r} differs from "
                        f"{first.bin_path}'s {first.manifest[key]!r}"
                    )
        self.dtype = first.dtype
        self.tokenizer_sha256: str = first.manifest["tokenizer_sha256"]

        self.source_names: list[str] = []
        for shard in self.shards:
            self.source_names += [s for s in shard.manifest["source_names"] if s not in self.source_names]
        self._shard_starts = np.cumsum([0] + [s.n_tokens for s in self.shards])
        self.n_tokens = int(self._shard_starts[-1])
        self.n_docs = sum(s.n_docs for s in self.shards)
        self.doc_starts = np.concatenate(
            [s.offsets[:-1] + base for s, base in zip(self.shards, self._shard_starts, strict=False)]
            + [np.array([self.n_tokens], dtype=np.int64)]
        )
        self.doc_bytes = np.concatenate([s.doc_bytes for s in self.shards])
        global_id = {name: i for i, name in enumerate(self.source_names)}
        self.source_ids = np.concatenate(
            [
                np.array([global_id[n] for n in s.manifest["source_names"]], dtype=np.int64)[s.source_ids]
                for s in self.shards
            ]
        )
        self.total_bytes = int(self.doc_bytes.sum())

    @property
    def manifest(self) -> dict[str, Any]:
        """Dataset-level totals plus every shard's own manifest."""
        sources: dict[str, dict[str, int]] = {n: {"docs": 0, "tokens": 0, "bytes": 0} for n in self.source_names}
        for shard in self.shards:
            for name, stats in shard.manifest["sources"].items():
                for key in ("docs", "tokens", "bytes"):
                    sources[name][key] += stats[key]
        return {
            "name": self.name,
            "tokenizer_sha256": self.tokenizer_sha256,
            "dtype": self.dtype.name,
            "n_tokens": self.n_tokens,
            "n_docs": self.n_docs,
            "n_bytes": self.total_bytes,
            "source_names": list(self.source_names),
            "sources": sources,
            "shards": [s.manifest for s in self.shards],
        }

    @functools.cached_property
    def fingerprint(self) -> str:
        """Identifies the tokenizer and document layout, not the sharding: loader state checks it on resume."""
        digest = xxhash.xxh64(f"{self.tokenizer_sha256}:{self.n_tokens}:{self.source_names}".encode())
        digest.update(self.doc_starts.astype("<i8").tobytes())
        digest.update(self.source_ids.astype("<i8").tobytes())
        return digest.hexdigest()

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream; a read-only view when inside one shard."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.n_tokens})")
        # A slice of the last shard when start == n_tokens (empty result), never past it.
        i = min(int(np.searchsorted(self._shard_starts, start, side="right")) - 1, len(self.shards) - 1)
        pieces = []
        while True:
            base, end = int(self._shard_starts[i]), int(self._shard_starts[i + 1])
            pieces.append(self.shards[i].tokens[start - base : min(stop, end) - base])
            if stop <= end or i + 1 == len(self.shards):
                break
            start, i = end, i + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def doc_index(self, positions: np.ndarray) -> np.ndarray:
        """Global document number (int64) of each token position; any array shape."""
        positions = np.asarray(positions)
        if positions.size and (positions.min() < 0 or positions.max() >= self.n_tokens):
            raise IndexError(f"token position outside [0, {self.n_tokens})")
        return np.searchsorted(self.doc_starts, positions, side="right").astype(np.int64) - 1

    def verify(self) -> None:
        """Recompute every shard's checksums; raises ShardError naming the first bad file."""
        for shard in self.shards:
            shard.verify()

    def check_tokenizer(self, sha256: str) -> None:
        if sha256 != self.tokenizer_sha256:
            raise ValueError(
                f"token shards {self.out_dir}/{self.name}-* were made with tokenizer {self.tokenizer_sha256[:12]}, "
                f"not {sha256[:12]}; re-run tokenization with the current tokenizer"
            )
