"""Token shards: documents -> one flat memory-mapped token stream with document boundaries kept.

Per shard `{name}-NNNNN`:
  .bin   tokens, uint16 or uint32, every document followed by EOS
  .idx   header (magic, version, n_docs), then document start offsets uint64[n+1] (the last one is
         the shard's token count), source ids uint16[n], zero padding to 8 bytes, document UTF-8
         byte lengths uint64[n] (for bits-per-byte)
  .json  manifest: tokenizer sha256, dtype, counts, sources, xxh64 checksums
Each file is written to a temporary name and renamed; the manifest is written last, so a shard
whose manifest exists is complete.

Per set, `{name}.json` lists the shards in order with their counts and checksums, plus the totals.
The writer removes it before touching any shard and writes it after the last one, so a set whose
manifest exists is complete; TokenDataset opens exactly the shards it lists and nothing else.

The writer (ShardWriter, write_token_shards) is in shard_writer.py; this module holds the format
and TokenDataset, the reader.
"""

from __future__ import annotations

import functools
import json
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

INDEX_MAGIC = b"LMFIDX\x00\x00"
INDEX_VERSION = 1
INDEX_HEADER = struct.Struct("<8sIIQ")  # magic, version, reserved, n_docs
MANIFEST_FORMAT = "lmforge-token-shard"
SET_FORMAT = "lmforge-token-shard-set"
SET_VERSION = 2  # 2: unigram counts beside the set
_RETOKENIZE = "re-run `lmforge tokenize`"
# What the set manifest repeats from each shard's own manifest; TokenDataset checks they agree.
LISTED_KEYS = ("n_tokens", "n_docs", "n_bytes", "bin_xxh64", "idx_xxh64")
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


def set_manifest_path(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / f"{name}.json"


def _shard_pattern(name: str) -> re.Pattern[str]:
    return re.compile(re.escape(name) + r"-(\d{5})\.(bin|idx|json)")


def shard_files(out_dir: Path, name: str) -> list[Path]:
    pattern = _shard_pattern(name)
    return sorted(p for p in out_dir.iterdir() if pattern.fullmatch(p.name))


def index_layout(n_docs: int) -> tuple[int, int, int, int]:
    """Byte offsets of (offsets, source ids, doc bytes) in a .idx file and its total size."""
    off_at = INDEX_HEADER.size
    src_at = off_at + 8 * (n_docs + 1)
    bytes_at = src_at + -(-2 * n_docs // 8) * 8  # source ids padded so the uint64 array is aligned
    return off_at, src_at, bytes_at, bytes_at + 8 * n_docs


def _xxh64_file(path: Path) -> str:
    digest = xxhash.xxh64()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def load_counts(path: Path, vocab_size: int) -> np.ndarray:
    """Unigram counts saved by a ShardWriter (np.load without pickle: the file is data only)."""
    if not path.is_file():
        raise ShardError(f"{path}: missing token counts; {_RETOKENIZE}")
    try:
        counts = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise ShardError(f"{path}: unreadable token counts ({e}); {_RETOKENIZE}") from e
    if counts.shape != (vocab_size,) or counts.dtype != np.int64:
        raise ShardError(f"{path}: counts of shape {counts.shape} {counts.dtype}, expected ({vocab_size},) int64")
    return counts


# ---------------------------------------------------------------- reading


class _Shard:
    """One shard opened and checked against its manifest."""

    def __init__(self, stem: Path):
        self.bin_path = stem.with_name(stem.name + ".bin")
        self.idx_path = stem.with_name(stem.name + ".idx")
        json_path = stem.with_name(stem.name + ".json")
        for p in (json_path, self.bin_path, self.idx_path):
            if not p.is_file():
                raise ShardError(f"{p}: missing; incomplete shard set, {_RETOKENIZE}")
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
        """Header and sizes checked now; the arrays are memory-mapped, read only where used (a rank
        never copies a billion-document index into memory). `verify` checks their contents."""
        off_at, src_at, bytes_at, size = index_layout(self.n_docs)
        actual = self.idx_path.stat().st_size
        if actual != size:
            raise ShardError(
                f"{self.idx_path}: {actual} bytes, expected {size} for {self.n_docs} documents; "
                "the file is truncated or corrupted"
            )
        with open(self.idx_path, "rb") as f:
            magic, version, _, n_docs = INDEX_HEADER.unpack(f.read(INDEX_HEADER.size))
        if magic != INDEX_MAGIC or version != INDEX_VERSION or n_docs != self.n_docs:
            raise ShardError(f"{self.idx_path}: bad header (magic {magic!r}, version {version}, {n_docs} docs)")
        n = self.n_docs
        raw = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        self.offsets = raw[off_at:src_at].view("<i8")  # written as uint64, always < 2^63
        self.source_ids = raw[src_at : src_at + 2 * n].view("<u2")
        self.doc_bytes = raw[bytes_at:size].view("<i8")
        if int(self.offsets[0]) != 0 or int(self.offsets[-1]) != self.n_tokens:
            raise ShardError(f"{self.idx_path}: document offsets are inconsistent with {self.n_tokens} tokens")

    def _check_index(self) -> None:
        # Every document holds at least its EOS, so starts strictly increase.
        if np.any(np.diff(self.offsets) <= 0):
            raise ShardError(f"{self.idx_path}: document offsets are inconsistent with {self.n_tokens} tokens")
        if self.n_docs and int(self.source_ids.max()) >= len(self.manifest["source_names"]):
            raise ShardError(f"{self.idx_path}: source id beyond the manifest's source_names")

    def verify(self) -> None:
        for path, key in ((self.bin_path, "bin_xxh64"), (self.idx_path, "idx_xxh64")):
            got = _xxh64_file(path)
            if got != self.manifest[key]:
                raise ShardError(f"{path}: xxh64 {got} does not match the manifest's {self.manifest[key]}")
        self._check_index()


def _read_set_manifest(out_dir: Path, name: str) -> dict[str, Any]:
    """The set manifest, checked for format and for naming its shards `{name}-00000`, ... in order."""
    path = set_manifest_path(out_dir, name)
    if not path.is_file():
        if shard_files(out_dir, name):
            raise ShardError(
                f"incomplete shard set: {path} is missing, so tokenization of {name!r} did not finish "
                f"(or the shards predate set manifests); {_RETOKENIZE}"
            )
        raise FileNotFoundError(f"no token shard set {name!r} in {out_dir} ({path.name} not found); {_RETOKENIZE}")
    try:
        m: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: set manifest is not valid JSON: {e}") from e
    if not isinstance(m, dict) or m.get("format") != SET_FORMAT or m.get("version") != SET_VERSION:
        got = (m.get("format"), m.get("version")) if isinstance(m, dict) else type(m).__name__
        raise ShardError(f"{path}: not a version {SET_VERSION} {SET_FORMAT} manifest (got {got!r})")
    missing = [k for k in ("name", "tokenizer_sha256", "dtype", "n_shards", "shards") if k not in m]
    if missing:
        raise ShardError(f"{path}: set manifest lacks {', '.join(missing)}")
    if m["name"] != name:
        raise ShardError(f"{path}: set manifest is for {m['name']!r}, not {name!r}")
    stems = [entry.get("stem") if isinstance(entry, dict) else None for entry in m["shards"]]
    # Stems come from a file: accept only our own names, so nothing outside out_dir is ever opened.
    if not stems or stems != [shard_stem(name, i) for i in range(len(stems))] or m["n_shards"] != len(stems):
        raise ShardError(f"{path}: shard list is not {shard_stem(name, 0)}, {shard_stem(name, 1)}, ... in order")
    return m


def _check_no_unlisted_shards(out_dir: Path, name: str, stems: list[str]) -> None:
    """Shards the manifest does not list are left over from another run: refuse rather than guess."""
    listed = set(stems)
    for p in shard_files(out_dir, name):
        if p.name.rsplit(".", 1)[0] not in listed:
            raise ShardError(
                f"{p}: shard not listed in {set_manifest_path(out_dir, name)}; the directory mixes shard sets, "
                f"{_RETOKENIZE}"
            )


def _check_listed(shard: _Shard, entry: dict[str, Any], set_manifest: dict[str, Any], set_path: Path) -> None:
    """A shard must be the one the set manifest recorded, not a same-named one from another run."""
    expected = {k: entry.get(k) for k in LISTED_KEYS}
    expected |= {k: set_manifest[k] for k in ("tokenizer_sha256", "dtype")}
    for key, want in expected.items():
        if shard.manifest.get(key) != want:
            raise ShardError(
                f"{shard.bin_path}: {key} {shard.manifest.get(key)!r} differs from {want!r} in {set_path}; "
                f"the shard set is inconsistent, {_RETOKENIZE}"
            )


class TokenDataset:
    """The shards listed in `out_dir/{name}.json`, presented as one concatenated token stream."""

    def __init__(self, out_dir: Path, name: str):
        self.out_dir = Path(out_dir)
        self.name = name
        if not self.out_dir.is_dir():
            raise FileNotFoundError(f"token shard directory not found: {self.out_dir}")
        self.set_manifest = _read_set_manifest(self.out_dir, name)
        stems = [entry["stem"] for entry in self.set_manifest["shards"]]
        _check_no_unlisted_shards(self.out_dir, name, stems)
        self.shards = [_Shard(self.out_dir / stem) for stem in stems]
        for shard, entry in zip(self.shards, self.set_manifest["shards"], strict=True):
            _check_listed(shard, entry, self.set_manifest, set_manifest_path(self.out_dir, name))
        self.dtype = np.dtype(self.set_manifest["dtype"])
        self.tokenizer_sha256: str = self.set_manifest["tokenizer_sha256"]

        self.source_names: list[str] = []
        for shard in self.shards:
            self.source_names += [s for s in shard.manifest["source_names"] if s not in self.source_names]
        self._shard_starts = np.cumsum([0] + [s.n_tokens for s in self.shards])
        self._shard_docs = np.cumsum([0] + [s.n_docs for s in self.shards])
        self.n_tokens = int(self._shard_starts[-1])
        self.n_docs = int(self._shard_docs[-1])
        self.total_bytes = int(self.set_manifest["n_bytes"])

    @functools.cached_property
    def doc_starts(self) -> np.ndarray:
        """int64 [n_docs + 1] start of every document in the stream (built on first use: the loader
        reads per-shard offsets instead, so memory does not grow with the corpus)."""
        return np.concatenate(
            [s.offsets[:-1] + base for s, base in zip(self.shards, self._shard_starts, strict=False)]
            + [np.array([self.n_tokens], dtype=np.int64)]
        )

    @functools.cached_property
    def doc_bytes(self) -> np.ndarray:
        return np.concatenate([s.doc_bytes for s in self.shards])

    @functools.cached_property
    def source_ids(self) -> np.ndarray:
        global_id = {name: i for i, name in enumerate(self.source_names)}
        return np.concatenate(
            [
                np.array([global_id[n] for n in s.manifest["source_names"]], dtype=np.int64)[s.source_ids]
                for s in self.shards
            ]
        )

    def doc_bounds(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start, stop) token positions of documents `docs` (global numbers, any int array)."""
        docs = np.asarray(docs, dtype=np.int64)
        if docs.size and (docs.min() < 0 or docs.max() >= self.n_docs):
            raise IndexError(f"document number outside [0, {self.n_docs})")
        shard = np.searchsorted(self._shard_docs, docs, side="right") - 1
        starts, stops = np.empty_like(docs), np.empty_like(docs)
        for i in np.unique(shard):
            at = shard == i
            local = docs[at] - self._shard_docs[i]
            base = self._shard_starts[i]
            starts[at] = self.shards[i].offsets[local] + base
            stops[at] = self.shards[i].offsets[local + 1] + base
        return starts, stops

    def counts(self) -> np.ndarray:
        """Unigram counts of the set (int64 [vocab_size]), written at tokenize time and checked."""
        path = self.out_dir / f"{self.name}.counts.npy"
        if not path.is_file() or _xxh64_file(path) != self.set_manifest.get("counts_xxh64"):
            raise ShardError(f"{path}: missing or not the counts {set_manifest_path(self.out_dir, self.name)} lists; "
                             f"{_RETOKENIZE}")
        return load_counts(path, int(self.set_manifest["vocab_size"]))

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
        """Identifies the tokenizer and the content, not the sharding: loader state checks it on resume.
        The content is the totals plus the checksum of the unigram counts (the same bytes however the
        stream is sharded, other bytes when a token changes). Read from the manifests only, so opening a
        set never scans its index."""
        return xxhash.xxh64(f"{self._totals_key}:{self.set_manifest.get('counts_xxh64')}".encode()).hexdigest()

    @functools.cached_property
    def legacy_fingerprint(self) -> str:
        """The fingerprint loader states of version 2 hold: the totals only."""
        return xxhash.xxh64(self._totals_key.encode()).hexdigest()

    @property
    def _totals_key(self) -> str:
        n_bytes = self.set_manifest["n_bytes"]
        return f"{self.tokenizer_sha256}:{self.n_tokens}:{self.n_docs}:{n_bytes}:{self.source_names}"

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
        """Global document number (int64) of each token position; any array shape. Looked up in the
        shard's own offsets, no corpus-sized array."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.n_tokens):
            raise IndexError(f"token position outside [0, {self.n_tokens})")
        shard = np.searchsorted(self._shard_starts, positions, side="right") - 1
        out = np.empty(positions.shape, dtype=np.int64)
        for i in np.unique(shard):
            at = shard == i
            local = positions[at] - self._shard_starts[i]
            out[at] = np.searchsorted(self.shards[i].offsets, local, side="right") - 1 + self._shard_docs[i]
        return out

    def doc_ids_range(self, start: int, stop: int) -> np.ndarray:
        """doc_index(arange(start, stop)) from two lookups and the boundaries in between: the loader
        calls it once per row, so it avoids a search per token."""
        if start >= stop:
            return np.zeros(0, dtype=np.int64)
        first, last = (int(d) for d in self.doc_index(np.array([start, stop - 1])))
        out = np.full(stop - start, first, dtype=np.int64)
        if last > first:
            boundaries = self.doc_bounds(np.arange(first + 1, last + 1))[0] - start
            out += np.searchsorted(boundaries, np.arange(stop - start), side="right")
        return out

    def verify(self) -> None:
        """Recompute every shard's checksums; raises ShardError naming the first bad file."""
        for shard in self.shards:
            shard.verify()

    def check_tokenizer(self, sha256: str) -> None:
        if sha256 != self.tokenizer_sha256:
            raise ValueError(
                f"{set_manifest_path(self.out_dir, self.name)}: tokenizer_sha256 {self.tokenizer_sha256[:12]} is "
                f"not the run's tokenizer.json ({sha256[:12]}): token shards {self.out_dir}/{self.name}-* were made "
                "with another tokenizer; re-run tokenization (lmforge tokenize) with the current one"
            )
