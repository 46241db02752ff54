"""Writing token shards (the format is described in shards.py): ShardWriter appends documents'
token ids and rolls shards over; write_token_shards tokenizes documents into one set."""

from __future__ import annotations

import bisect
import io
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from tokenizers import Tokenizer
from tqdm import tqdm

from lmforge.data.document import Document
from lmforge.io_utils import AtomicFile, atomic_write_bytes, atomic_write_json
from lmforge.tokenizer.special_tokens import load_special_tokens
from lmforge.tokenizer.train import tokenizer_hash
from lmforge.tokens.shards import (
    INDEX_HEADER,
    INDEX_MAGIC,
    INDEX_VERSION,
    LISTED_KEYS,
    MANIFEST_FORMAT,
    SET_FORMAT,
    SET_VERSION,
    choose_dtype,
    index_layout,
    load_counts,
    set_manifest_path,
    shard_files,
    shard_stem,
)

ENCODE_BATCH_DOCS = 256  # documents per encoder call, at most
# ...and about this many characters: the first batch is read before any encoding starts and the
# last one is written after it ends, so small batches keep that unoverlapped time short.
ENCODE_BATCH_CHARS = 1 << 18
# Buffer this many tokens before a write: few syscalls, yet small enough that the counting, casting
# and hashing of a flush overlap the encoder instead of piling up at the end of a shard.
_FLUSH_TOKENS = 1 << 18


class ShardWriter:
    """Append documents' token ids; shards roll over at `max_shard_tokens`.

    Use as a context manager: entering removes the old set of this name (its set manifest first); on
    a clean exit the last shard is finished, the set manifest written and `summary` set; on an
    exception the unfinished shard's temporary file is removed and no set manifest is written, so
    the finished shards stay unreadable as a set. A document is never split across shards, so a
    single document longer than `max_shard_tokens` gets an oversized shard of its own.
    """

    def __init__(
        self,
        out_dir: Path,
        name: str,
        tokenizer_sha256: str,
        vocab_size: int,
        dtype: str = "auto",
        max_shard_tokens: int = 2**31,
        eos_id: int = 0,
    ):
        if max_shard_tokens < 1:
            raise ValueError(f"max_shard_tokens must be >= 1, got {max_shard_tokens}")
        self.out_dir = Path(out_dir)
        self.name = name
        self.tokenizer_sha256 = tokenizer_sha256
        self.vocab_size = vocab_size
        self.dtype = choose_dtype(vocab_size, dtype)
        self.max_shard_tokens = max_shard_tokens
        self.eos_id = eos_id  # the tokenizer's end-of-document role, appended after every document
        self.summary: dict[str, Any] | None = None
        self._n_shards = 0
        self._listing: list[dict[str, Any]] = []  # one entry per finished shard, for the set manifest
        self._totals: dict[str, dict[str, int]] = {}
        # Unigram counts of the whole set (EOS included), kept so evaluation never rescans the corpus.
        self.counts = np.zeros(vocab_size, dtype=np.int64)
        self._out: AtomicFile | None = None  # the shard being written
        self._resume: dict[str, Any] | None = None

    def resume(self, state: dict[str, Any]) -> ShardWriter:
        """Continue a set from `progress()` of an interrupted writer: its finished shards are kept,
        anything written after them is removed on enter. Call before entering."""
        self._resume = state
        return self

    def progress(self) -> dict[str, Any]:
        """What `resume` needs, valid right after `roll()` (no shard open). Counts travel separately
        (`save_counts`), being vocabulary-sized."""
        assert self._out is None, "progress() is taken between shards"
        return {"n_shards": self._n_shards, "listing": self._listing, "totals": self._totals}

    def __enter__(self) -> ShardWriter:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # The set manifest goes first: from here until __exit__ writes a new one, the set is
        # unreadable, so a crash part-way can never leave old and new shards that open as one set.
        set_manifest_path(self.out_dir, self.name).unlink(missing_ok=True)
        keep = set()
        if self._resume is not None:
            self._n_shards = int(self._resume["n_shards"])
            self._listing = list(self._resume["listing"])
            self._totals = {k: dict(v) for k, v in self._resume["totals"].items()}
            keep = {f"{e['stem']}.{ext}" for e in self._listing for ext in ("bin", "idx", "json")}
            self.counts = load_counts(self.counts_path(partial=True), self.vocab_size)
        for p in shard_files(self.out_dir, self.name):
            if p.name not in keep:
                p.unlink()
        return self

    def counts_path(self, partial: bool = False) -> Path:
        return self.out_dir / f"{self.name}.counts{'.partial' if partial else ''}.npy"

    def roll(self) -> None:
        """Finish the open shard now (a checkpoint boundary for a resumable writer)."""
        if self._out is not None:
            self._finish_shard()

    def save_counts(self, partial: bool = False) -> str:
        """Write the unigram counts atomically (np.save, no pickle); returns their xxh64."""
        buf = io.BytesIO()
        np.save(buf, self.counts, allow_pickle=False)
        data = buf.getvalue()
        atomic_write_bytes(self.counts_path(partial), data)
        return xxhash.xxh64(data).hexdigest()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            if self._out is not None:
                self._out.abort()
            return
        if self._out is not None or self._n_shards == 0:
            self._finish_shard()  # with no documents at all, an empty shard keeps the set openable
        counts_xxh64 = self.save_counts()
        self.counts_path(partial=True).unlink(missing_ok=True)
        self._write_set_manifest(counts_xxh64)
        self.summary = self._summary()

    def add(self, ids: np.ndarray | list[int], source: str, n_bytes: int) -> None:
        """One document's token ids (without EOS; it is appended here) and its UTF-8 length."""
        ids = np.asarray(ids)  # range-checked at the flush, once per buffer, before the cast to dtype
        n = ids.size + 1
        self._open_for([n], 0)
        self._buffer.append(ids)
        self._buffered += n
        self._record(source, [n], [n_bytes])
        if self._buffered >= _FLUSH_TOKENS:
            self._flush()

    def add_packed(self, packed: Packed, source: str) -> None:
        """Documents `pack()` made (on an encoder thread, say), all of `source`: their tokens are
        written as they are. The same bytes as `add()` of each document in turn."""
        if packed.tokens.dtype != self.dtype:
            raise ValueError(f"packed as {packed.tokens.dtype}, but the set {self.name!r} is {self.dtype}")
        self.counts += packed.counts
        at = offset = 0
        while at < len(packed.lengths):
            end = self._open_for(packed.lengths, at)
            size = sum(packed.lengths[at:end])
            self._flush()  # documents add()ed before these go first
            assert self._out is not None
            piece = packed.tokens[offset : offset + size]
            self._out.write(piece)
            self._hash.update(piece)
            self._record(source, packed.lengths[at:end], packed.n_bytes[at:end])
            at, offset = end, offset + size

    def _open_for(self, lengths: list[int], at: int) -> int:
        """Open a shard with room for documents at, at+1, ... and return where they stop fitting (at
        least one document: a longer one gets an oversized shard of its own)."""
        if self._out is not None and self._shard_tokens + lengths[at] > self.max_shard_tokens:
            self._finish_shard()
        if self._out is None:
            self._start_shard()
        room = self.max_shard_tokens - self._shard_tokens
        return at + max(1, bisect.bisect_right(list(itertools.accumulate(lengths[at:])), room))

    def _record(self, source: str, lengths: list[int], n_bytes: list[int]) -> None:
        """The index entries and counts of documents just appended to the open shard."""
        source_id = self._sources.setdefault(source, len(self._sources))
        if source_id >= 2**16:
            raise ValueError("more than 65536 sources in one shard")
        ends = list(itertools.accumulate(lengths, initial=self._shard_tokens))[1:]
        self._starts.extend(ends)
        self._shard_tokens = ends[-1]
        self._source_ids.extend([source_id] * len(lengths))
        self._doc_bytes.extend(n_bytes)
        stats = self._per_source.setdefault(source, {"docs": 0, "tokens": 0, "bytes": 0})
        stats["docs"] += len(lengths)
        stats["tokens"] += sum(lengths)
        stats["bytes"] += sum(n_bytes)

    def _start_shard(self) -> None:
        self._stem = shard_stem(self.name, self._n_shards)
        self._out = AtomicFile(self.out_dir / f"{self._stem}.bin")
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
        assert self._out is not None
        if self._buffer:
            tokens, counts = _pack_tokens(self._buffer, self.eos_id, self.vocab_size, self.dtype,
                                          f" in {self.out_dir / self._stem}")
            self.counts += counts
            self._out.write(tokens)
            self._hash.update(tokens)
        self._buffer = []
        self._buffered = 0

    def _finish_shard(self) -> None:
        if self._out is None:
            self._start_shard()
        assert self._out is not None
        self._flush()
        self._out.commit()
        self._out = None

        n_docs = len(self._source_ids)
        _, src_at, bytes_at, size = index_layout(n_docs)
        index = bytearray(size)
        INDEX_HEADER.pack_into(index, 0, INDEX_MAGIC, INDEX_VERSION, 0, n_docs)
        index[INDEX_HEADER.size : src_at] = np.asarray(self._starts, dtype="<u8").tobytes()
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
        self._listing.append({"stem": self._stem, **{k: manifest[k] for k in LISTED_KEYS}})
        for source, stats in self._per_source.items():
            total = self._totals.setdefault(source, {"docs": 0, "tokens": 0, "bytes": 0})
            for key, value in stats.items():
                total[key] += value
        self._n_shards += 1

    def _write_set_manifest(self, counts_xxh64: str) -> None:
        """Written last: its presence is what marks the set complete."""
        manifest = {
            "format": SET_FORMAT,
            "version": SET_VERSION,
            "name": self.name,
            "tokenizer_sha256": self.tokenizer_sha256,
            "vocab_size": self.vocab_size,
            "dtype": self.dtype.name,
            "n_shards": self._n_shards,
            **{key: sum(entry[key] for entry in self._listing) for key in ("n_tokens", "n_docs", "n_bytes")},
            "shards": self._listing,
            "counts_xxh64": counts_xxh64,
        }
        atomic_write_json(set_manifest_path(self.out_dir, self.name), manifest)

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


@dataclass
class Packed:
    """Documents ready for `ShardWriter.add_packed`: their ids, each followed by EOS, in the set's dtype."""

    tokens: np.ndarray
    lengths: list[int]  # tokens per document, EOS included
    n_bytes: list[int]  # UTF-8 bytes per document
    counts: np.ndarray  # how often each id occurs in `tokens`, [vocab_size]
    # tokens.language_tags: documents per tag code ("" for those with no tag); empty when off
    tag_counts: dict[str, int] = field(default_factory=dict)


def pack(
    ids: Sequence[np.ndarray | Sequence[int]], n_bytes: Sequence[int], eos_id: int, vocab_size: int, dtype: np.dtype
) -> Packed:
    """Documents' token ids (without EOS) as one array, range-checked and counted: the work of a
    flush, done where the ids were made (an encoder thread) instead of in the writer's thread."""
    tokens, counts = _pack_tokens(ids, eos_id, vocab_size, dtype)
    return Packed(tokens, [len(x) + 1 for x in ids], list(n_bytes), counts)


def pack_joined(
    tokens: np.ndarray, lengths: Sequence[int], n_bytes: Sequence[int], eos_id: int, vocab_size: int, dtype: np.dtype
) -> Packed:
    """As `pack`, for documents an encoder already joined, each followed by EOS (`FastEncoder.encode_joined`)
    with `lengths` counting it: checked to end every document with EOS, range-checked, counted."""
    ends = np.cumsum(lengths, dtype=np.int64) - 1
    if len(lengths) != len(n_bytes) or (ends[-1] + 1 if len(ends) else 0) != tokens.size or \
            (len(ends) and (min(lengths) < 1 or np.any(tokens[ends] != eos_id))):
        raise ValueError(f"joined tokens ({tokens.size}) are not {len(n_bytes)} documents each ending in EOS {eos_id}")
    tokens, counts = _count_and_cast(tokens, vocab_size, dtype)
    return Packed(tokens, list(lengths), list(n_bytes), counts)


def _pack_tokens(
    ids: Sequence[np.ndarray | Sequence[int]], eos_id: int, vocab_size: int, dtype: np.dtype, where: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    eos = np.array([eos_id], dtype=np.int64)
    tokens = np.concatenate([x for doc in ids for x in (doc, eos)], dtype=np.int64, casting="unsafe")  # ids < 2^32
    return _count_and_cast(tokens, vocab_size, dtype, where)


def _count_and_cast(
    tokens: np.ndarray, vocab_size: int, dtype: np.dtype, where: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    # bincount is the range check too (it refuses negatives; a larger id lengthens it): no separate
    # min/max passes over the tokens.
    try:
        counts = np.bincount(tokens, minlength=vocab_size)
    except ValueError:  # it refuses negative ids
        counts = None
    if counts is None or counts.size > vocab_size:
        bad = int(tokens.min()) if counts is None else counts.size - 1
        raise ValueError(f"token id {bad} out of range [0, {vocab_size}){where}")
    return tokens.astype(dtype), counts


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
    """Tokenize `docs` into `out_dir/{name}-NNNNN.{bin,idx,json}` plus the set manifest `{name}.json`;
    return totals and per-source stats."""
    eos_id = load_special_tokens(tokenizer_path, tokenizer).eos
    writer = ShardWriter(
        out_dir, name, tokenizer_hash(tokenizer_path), tokenizer.get_vocab_size(), dtype, max_shard_tokens, eos_id
    )
    # A document quoting "<|endoftext|>" must not produce a real EOS, or it would split in two.
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        with writer, tqdm(desc=f"tokenize {name}", unit="doc", disable=not progress) as bar:
            for batch in doc_batches(docs):
                encodings = tokenizer.encode_batch([d.text for d in batch], add_special_tokens=False)
                for doc, enc in zip(batch, encodings, strict=True):
                    writer.add(enc.ids, doc.source, doc.n_bytes)
                bar.update(len(batch))
    finally:
        tokenizer.encode_special_tokens = previous
    assert writer.summary is not None
    return writer.summary


def doc_batches(
    docs: Iterable[Document], max_docs: int = ENCODE_BATCH_DOCS, max_chars: int = ENCODE_BATCH_CHARS
) -> Iterator[list[Document]]:
    """Consecutive documents, a batch ending at `max_docs` documents or `max_chars` characters."""
    batch: list[Document] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text)
        if len(batch) == max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch
