"""Rows of one source for the loader: greedy windows or BOS-aligned best-fit rows, shuffled per epoch.

Both samplers advance a cursor (plain ints, saved in the loader state) and report, per row, the
source tokens the row *consumed*: the tokens it holds from the stream plus those the packing gives
up for it (best_fit's cropped tails; greedy's stream tail that no full window covers, charged on an
epoch's last row). One epoch therefore consumes exactly the source's token count, which is what the
loader's epochs-per-source accounting divides by.
"""

from __future__ import annotations

import bisect

import numpy as np
import xxhash

from lmforge.tokens.permutation import Permutation
from lmforge.tokens.shards import TokenDataset

_BLOCK = 4096  # samples permuted per vectorised call

Pieces = list[tuple[int, int]]  # (start, length) spans of the source's stream


def n_windows(n_tokens: int, window: int) -> int:
    """Number of full windows at stride window-1 in a stream of n_tokens."""
    if window < 2:
        raise ValueError(f"window must be >= 2 (inputs plus one target), got {window}")
    return 0 if n_tokens < window else (n_tokens - window) // (window - 1) + 1


def source_key(name: str) -> int:
    return xxhash.xxh64_intdigest(name.encode("utf-8"))


class GreedySource:
    """Windows at stride window-1 over one source's stream, shuffled per epoch."""

    def __init__(self, ds: TokenDataset, window: int, seed: int):
        self.ds, self.window, self.seed = ds, window, seed
        self.n_samples = n_windows(ds.n_tokens, window)
        if self.n_samples == 0:
            raise ValueError(
                f"token set {ds.out_dir}/{ds.name} has {ds.n_tokens} tokens, fewer than one window of "
                f"{window}; add data, drop the source from the mixture or lower train.seq_len"
            )
        self.tail = ds.n_tokens - self.n_samples * (window - 1)  # tokens an epoch's windows add nothing for
        self._block_key: tuple[int, int] | None = None
        self._block = np.zeros(0, dtype=np.int64)

    def fresh(self) -> dict[str, int]:
        return {"epoch": 0, "index": 0}

    def take(self, cursor: dict[str, int]) -> tuple[Pieces, int, int]:
        """The next row as [(start, length)] of the stream, the tokens it consumed and those it
        cropped (none); advances `cursor`."""
        sample = self._sample(cursor["epoch"], cursor["index"])
        cursor["index"] += 1
        consumed = self.window - 1
        if cursor["index"] == self.n_samples:
            cursor["epoch"], cursor["index"] = cursor["epoch"] + 1, 0
            consumed += self.tail
        return [(sample * (self.window - 1), self.window)], consumed, 0

    def consumed_before(self, cursor: dict[str, int]) -> int:
        """Tokens consumed by the rows taken up to `cursor` (rebuilds the count for old loader states)."""
        return cursor["epoch"] * self.ds.n_tokens + cursor["index"] * (self.window - 1)

    def _sample(self, epoch: int, index: int) -> int:
        # Permuted a block at a time: one vectorised call per _BLOCK rows instead of one per row.
        block = index // _BLOCK
        if self._block_key != (epoch, block):
            perm = Permutation(self.n_samples, (self.seed, source_key(self.ds.name), epoch))
            self._block = perm(np.arange(block * _BLOCK, min((block + 1) * _BLOCK, self.n_samples)))
            self._block_key = (epoch, block)
        return int(self._block[index - block * _BLOCK])


class BestFitSource:
    """BOS-aligned rows packed best-fit from blocks of `block_docs` shuffled documents: the loader
    writes EOS (the document-start context) at position 0 and the pieces fill the other window-1."""

    def __init__(self, ds: TokenDataset, window: int, seed: int, long_docs: str = "crop", block_docs: int = 1024):
        if ds.n_docs == 0:
            raise ValueError(f"token set {ds.out_dir}/{ds.name} has no documents")
        if window < 2:
            raise ValueError(f"window must be >= 2 (EOS plus one token), got {window}")
        if ds.n_tokens < window - 1:
            raise ValueError(
                f"token set {ds.out_dir}/{ds.name} has {ds.n_tokens} tokens, fewer than one row of {window} "
                "(EOS + window-1 tokens); add data, drop the source from the mixture or lower train.seq_len"
            )
        self.ds, self.window, self.seed = ds, window, seed
        self.capacity = window - 1
        self.long_docs, self.block_docs = long_docs, block_docs
        self.n_blocks = -(-ds.n_docs // block_docs)
        self.eos = int(ds.tokens(ds.n_tokens - 1, ds.n_tokens)[0])  # every document ends with it
        self._cache: tuple[tuple[int, int], list[Pieces], int] | None = None

    def fresh(self) -> dict[str, int]:
        return {"epoch": 0, "block": 0, "row": 0}

    def take(self, cursor: dict[str, int]) -> tuple[Pieces, int, int]:
        """The next row's pieces, the tokens it consumed and those cropped: a block's cropped tokens
        are charged with its first row (those of blocks too small for any row, as they are passed).
        The cursor then moves on within the epoch, so an epoch's last row closes the epoch: its rows
        consume exactly the source's tokens."""
        cropped = self._skip_exhausted(cursor)  # a fresh cursor (or an old state's) may sit on none
        rows, block_cropped = self._rows(cursor["epoch"], cursor["block"])
        if cursor["row"] == 0:
            cropped += block_cropped
        row = rows[cursor["row"]]
        cursor["row"] += 1
        cropped += self._skip_exhausted(cursor, within_epoch=True)
        return row, self.capacity + cropped, cropped

    def check_fills_a_row(self) -> None:
        """The ValueError `take` would raise when no block of documents fills a row (packs the first
        block that does: the one a fresh cursor draws from, so the work is cached, not repeated)."""
        self._skip_exhausted(self.fresh())

    def consumed_before(self, cursor: dict[str, int]) -> int:
        """Tokens consumed by the rows taken up to `cursor` (rebuilds the count for old loader states)."""
        perm = Permutation(self.ds.n_docs, (self.seed, source_key(self.ds.name), cursor["epoch"]))
        starts, stops = self.ds.doc_bounds(perm(np.arange(cursor["block"] * self.block_docs)))
        done = cursor["epoch"] * self.ds.n_tokens + int((stops - starts).sum())
        if cursor["row"]:
            rows, cropped = self._rows(cursor["epoch"], cursor["block"])
            done += cropped + min(cursor["row"], len(rows)) * self.capacity
        return done

    def _skip_exhausted(self, cursor: dict[str, int], within_epoch: bool = False) -> int:
        """Moves `cursor` to the next row there is (or, `within_epoch`, to the next epoch's start if
        that comes first); returns the tokens of the row-less blocks passed."""
        cropped = passed = 0
        while True:
            rows, block_cropped = self._rows(cursor["epoch"], cursor["block"])
            if cursor["row"] < len(rows):
                return cropped
            if not rows:
                cropped += block_cropped
            passed += 1
            if passed > self.n_blocks:
                raise ValueError(
                    f"token set {self.ds.out_dir}/{self.ds.name}: no block of {self.block_docs} documents fills "
                    f"a row of {self.window} tokens; raise tokens.block_docs or lower train.seq_len"
                )
            cursor["row"], cursor["block"] = 0, cursor["block"] + 1
            if cursor["block"] == self.n_blocks:
                cursor["epoch"], cursor["block"] = cursor["epoch"] + 1, 0
                if within_epoch:
                    return cropped

    def _rows(self, epoch: int, block: int) -> tuple[list[Pieces], int]:
        if self._cache is None or self._cache[0] != (epoch, block):
            perm = Permutation(self.ds.n_docs, (self.seed, source_key(self.ds.name), epoch))
            first = block * self.block_docs
            docs = perm(np.arange(first, min(first + self.block_docs, self.ds.n_docs)))
            starts, stops = self.ds.doc_bounds(docs)
            rows, cropped = pack_best_fit(starts.tolist(), (stops - starts).tolist(), self.capacity, self.long_docs)
            self._cache = ((epoch, block), rows, cropped)
        return self._cache[1], self._cache[2]


def pack_best_fit(
    starts: list[int], lengths: list[int], capacity: int, long_docs: str = "crop"
) -> tuple[list[Pieces], int]:
    """Rows of exactly `capacity` tokens as [(start, length), ...] pieces, each row beginning at a
    document (or split piece) start, and the number of tokens cropped (including a last row that
    could not be filled). Deterministic: ties go to the earlier document. (The loader packs
    window-1 tokens per row behind the row's leading EOS.)"""
    pieces: list[tuple[int, int]] = []  # (length, start), kept sorted
    cropped = 0
    for start, length in zip(starts, lengths, strict=True):
        if length > capacity and long_docs == "split":
            whole = range(0, length - length % capacity, capacity)
            pieces += [(capacity, start + off) for off in whole]
            if length % capacity:
                pieces.append((length % capacity, start + length - length % capacity))
        elif length > capacity:
            pieces.append((capacity, start))
            cropped += length - capacity
        else:
            pieces.append((length, start))
    pieces.sort()
    rows = []
    while pieces:
        row, gap = [], capacity
        while gap and pieces:
            i = bisect.bisect_right(pieces, (gap, float("inf")))  # pieces[:i] fit
            if i:
                length, start = pieces.pop(i - 1)
                row.append((start, length))
                gap -= length
            else:  # nothing fits (so the row has a piece): the shortest longer one fills the gap, its tail cropped
                length, start = pieces.pop(0)
                row.append((start, gap))
                cropped += length - gap
                gap = 0
        if gap:  # the block ran out of documents: this row is not filled
            cropped += capacity - gap
            break
        rows.append(row)
    return rows, cropped
