"""Batches of token windows drawn from a mixture of sources: deterministic, stateful, resumable.

Each source is a token set (one per source of the split). Per source, samples come in one of two
packings:
- `greedy`: sample k is the window of `window` tokens starting at k*(window-1) of the source's
  stream (consecutive samples share one token, so every token after the first is a next-token
  target once per epoch); rows cross documents.
- `best_fit`: every row starts at a document start. Documents are taken in blocks (in the epoch's
  shuffled order); each row is filled with the longest document that still fits, and when none
  fits, with the head of the shortest one longer than the gap, whose tail is cropped; rows are
  always full (100% utilisation), the cropped share is counted. A document longer than the window
  is cropped to it, or with `long_docs: split` cut into window-sized pieces. A block's last,
  unfilled row is dropped and counted as cropped.
Sources are interleaved by smooth weighted round-robin on their token weights (mixture.py), so
every prefix of the run matches the mixture to within two rows per source. Samples are shuffled by a keyed Feistel
permutation (O(1) memory). The state (stage, per-source cursors, round-robin credits, draws) is
global, so a resume continues the same global batches on any number of ranks; a global batch is
batch_size * world_size consecutive draws and rank r takes rows [r*batch_size, (r+1)*batch_size).
"""

from __future__ import annotations

import bisect
import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import xxhash

from lmforge.tokens.mixture import SmoothRoundRobin
from lmforge.tokens.permutation import Permutation
from lmforge.tokens.shards import TokenDataset

log = logging.getLogger(__name__)
_BLOCK = 4096  # samples permuted per vectorised call
_SOURCE_STRIDE = 1 << 40  # doc ids of source i live in [i * 2^40, (i + 1) * 2^40): unique across sources


class Batch(NamedTuple):
    """Rows of raw tokens: tokens and doc_ids int64 [B, window]; sample_ids int64 [B], the global draw
    number of each row, which keys the row's objective randomness (so the noise a sample gets does
    not depend on rank, world size or resume); source_ids int64 [B], the row's source index."""

    tokens: np.ndarray
    doc_ids: np.ndarray
    sample_ids: np.ndarray
    source_ids: np.ndarray | None = None


def n_windows(n_tokens: int, window: int) -> int:
    """Number of full windows at stride window-1 in a stream of n_tokens."""
    if window < 2:
        raise ValueError(f"window must be >= 2 (inputs plus one target), got {window}")
    return 0 if n_tokens < window else (n_tokens - window) // (window - 1) + 1


@dataclass
class Stage:
    """A curriculum stage: `tokens` drawn (0 = until the run ends) with its window and weights."""

    tokens: int
    window: int
    weights: dict[str, float]


def _source_key(name: str) -> int:
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
        self._block_key: tuple[int, int] | None = None
        self._block = np.zeros(0, dtype=np.int64)

    def fresh(self) -> dict[str, int]:
        return {"epoch": 0, "index": 0}

    def take(self, cursor: dict[str, int]) -> list[tuple[int, int]]:
        """The next row as [(start, length)] of the stream; advances `cursor`."""
        sample = self._sample(cursor["epoch"], cursor["index"])
        cursor["index"] += 1
        if cursor["index"] == self.n_samples:
            cursor["epoch"], cursor["index"] = cursor["epoch"] + 1, 0
        return [(sample * (self.window - 1), self.window)]

    def _sample(self, epoch: int, index: int) -> int:
        # Permuted a block at a time: one vectorised call per _BLOCK rows instead of one per row.
        block = index // _BLOCK
        if self._block_key != (epoch, block):
            perm = Permutation(self.n_samples, (self.seed, _source_key(self.ds.name), epoch))
            self._block = perm(np.arange(block * _BLOCK, min((block + 1) * _BLOCK, self.n_samples)))
            self._block_key = (epoch, block)
        return int(self._block[index - block * _BLOCK])


class BestFitSource:
    """BOS-aligned rows packed best-fit from blocks of `block_docs` shuffled documents."""

    def __init__(self, ds: TokenDataset, window: int, seed: int, long_docs: str = "crop", block_docs: int = 1024):
        if ds.n_docs == 0:
            raise ValueError(f"token set {ds.out_dir}/{ds.name} has no documents")
        self.ds, self.window, self.seed = ds, window, seed
        self.long_docs, self.block_docs = long_docs, block_docs
        self.n_blocks = -(-ds.n_docs // block_docs)
        self._cache: tuple[tuple[int, int], list[list[tuple[int, int]]], int] | None = None

    def fresh(self) -> dict[str, int]:
        return {"epoch": 0, "block": 0, "row": 0}

    def take(self, cursor: dict[str, int]) -> tuple[list[tuple[int, int]], int]:
        """The next row's pieces, plus the tokens cropped to make the block it came from (counted when
        a block's first row is taken)."""
        while True:
            rows, cropped = self._rows(cursor["epoch"], cursor["block"])
            if cursor["row"] < len(rows):
                row = rows[cursor["row"]]
                charged = cropped if cursor["row"] == 0 else 0
                cursor["row"] += 1
                return row, charged
            cursor["row"], cursor["block"] = 0, cursor["block"] + 1
            if cursor["block"] == self.n_blocks:
                cursor["epoch"], cursor["block"] = cursor["epoch"] + 1, 0

    def _rows(self, epoch: int, block: int) -> tuple[list[list[tuple[int, int]]], int]:
        if self._cache is None or self._cache[0] != (epoch, block):
            perm = Permutation(self.ds.n_docs, (self.seed, _source_key(self.ds.name), epoch))
            first = block * self.block_docs
            docs = perm(np.arange(first, min(first + self.block_docs, self.ds.n_docs)))
            starts, stops = self.ds.doc_bounds(docs)
            rows, cropped = pack_best_fit(starts.tolist(), (stops - starts).tolist(), self.window, self.long_docs)
            self._cache = ((epoch, block), rows, cropped)
        return self._cache[1], self._cache[2]


def pack_best_fit(
    starts: list[int], lengths: list[int], window: int, long_docs: str = "crop"
) -> tuple[list[list[tuple[int, int]]], int]:
    """Rows of exactly `window` tokens as [(start, length), ...] pieces, each row beginning at a
    document (or split piece) start, and the number of tokens cropped (including a last row that
    could not be filled). Deterministic: ties go to the earlier document."""
    pieces: list[tuple[int, int]] = []  # (length, start), kept sorted
    cropped = 0
    for start, length in zip(starts, lengths, strict=True):
        if length > window and long_docs == "split":
            whole = range(0, length - length % window, window)
            pieces += [(window, start + off) for off in whole]
            if length % window:
                pieces.append((length % window, start + length - length % window))
        elif length > window:
            pieces.append((window, start))
            cropped += length - window
        else:
            pieces.append((length, start))
    pieces.sort()
    rows = []
    while pieces:
        row, gap = [], window
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
            cropped += window - gap
            break
        rows.append(row)
    return rows, cropped


class PackedLoader:
    """Batches [batch_size, window] of tokens and document ids for one rank, drawn from a mixture
    of sources (one TokenDataset is a mixture of one), optionally through curriculum stages."""

    def __init__(
        self,
        sources: dict[str, TokenDataset] | TokenDataset,
        window: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        weights: dict[str, float] | None = None,
        packing: str = "greedy",
        long_docs: str = "crop",
        block_docs: int = 1024,
        stages: list[Stage] | None = None,
        max_epochs: float = 0.0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        if packing not in ("greedy", "best_fit"):
            raise ValueError(f"packing must be 'greedy' or 'best_fit', got {packing!r}")
        self.sources = {sources.name: sources} if isinstance(sources, TokenDataset) else dict(sources)
        self.names = sorted(self.sources)
        default = weights or {n: float(self.sources[n].n_tokens) for n in self.names}
        total = sum(default.values())
        self.stages = stages or [Stage(0, window, {n: w / total for n, w in default.items()})]
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.packing, self.long_docs, self.block_docs, self.max_epochs = packing, long_docs, block_docs, max_epochs
        self._streams: dict[tuple[str, int], GreedySource | BestFitSource] = {}
        for stage in self.stages:
            for name, w in stage.weights.items():
                if w > 0:
                    self._stream(name, stage.window)  # fail now, not mid-run, on a source too small
        self.state = self._fresh_state()

    @property
    def window(self) -> int:
        return self.stages[self.state["stage"]].window

    @property
    def n_samples(self) -> int:
        """Samples per epoch of the current stage's sources (greedy packing), for reporting."""
        stage = self.stages[self.state["stage"]]
        return sum(getattr(self._stream(n, stage.window), "n_samples", 0) for n in stage.weights)

    def _fresh_state(self) -> dict[str, Any]:
        return {"stage": 0, "stage_start": 0, "draws": 0, "tokens": 0, "cropped": 0, "credits": {},
                "cursors": {}, "source_tokens": {n: 0 for n in self.names}}

    def _stream(self, name: str, window: int) -> GreedySource | BestFitSource:
        if name not in self.sources:
            raise ValueError(f"mixture names source {name!r}, but the token sets have {self.names}")
        key = (name, window)
        if key not in self._streams:
            ds = self.sources[name]
            self._streams[key] = (
                GreedySource(ds, window, self.seed) if self.packing == "greedy"
                else BestFitSource(ds, window, self.seed, self.long_docs, self.block_docs)
            )
        return self._streams[key]

    def _advance_stage(self) -> None:
        """Stages switch at a batch boundary: the first one at or after the stage's token budget."""
        st = self.state
        while st["stage"] + 1 < len(self.stages):
            budget = self.stages[st["stage"]].tokens
            if budget <= 0 or st["tokens"] - st["stage_start"] < budget:
                return
            st["stage"] += 1
            st["stage_start"] = st["tokens"]
            st["credits"] = {}

    def _draw(self) -> tuple[str, list[tuple[int, int]]]:
        stage = self.stages[self.state["stage"]]
        name = SmoothRoundRobin(stage.weights, self.state["credits"]).choose()
        stream = self._stream(name, stage.window)
        cursor = self.state["cursors"].setdefault(f"{name}@{stage.window}", stream.fresh())
        before = cursor["epoch"]
        if isinstance(stream, BestFitSource):
            pieces, cropped = stream.take(cursor)
            self.state["cropped"] += cropped
        else:
            pieces = stream.take(cursor)
        if cursor["epoch"] != before and self.max_epochs and cursor["epoch"] >= self.max_epochs:
            log.warning("source %r starts epoch %d (more than %g): a small source is repeating",
                        name, cursor["epoch"] + 1, self.max_epochs)
        self.state["draws"] += 1
        self.state["tokens"] += stage.window
        self.state["source_tokens"][name] += stage.window
        return name, pieces

    def next_batch(self, batch_size: int | None = None) -> Batch:
        """This rank's rows of the next global batch (batch_size rows per rank; a batch ramp passes
        its own size)."""
        self._advance_stage()
        n = batch_size or self.batch_size
        first_id = self.state["draws"]
        drawn = [self._draw() for _ in range(n * self.world_size)]
        mine = range(self.rank * n, (self.rank + 1) * n)
        return self._read([drawn[i] for i in mine], [first_id + i for i in mine])

    def _read(self, rows: list[tuple[str, list[tuple[int, int]]]], ids: list[int]) -> Batch:
        window = self.stages[self.state["stage"]].window
        tokens = np.empty((len(rows), window), dtype=np.int64)
        doc_ids = np.empty((len(rows), window), dtype=np.int64)
        for r, ((name, pieces), sample_id) in enumerate(zip(rows, ids, strict=True)):
            ds, offset = self.sources[name], self.names.index(name) * _SOURCE_STRIDE
            at = 0
            for k, (start, length) in enumerate(pieces):
                tokens[r, at : at + length] = ds.tokens(start, start + length)
                if self.packing == "greedy":
                    doc_ids[r, at : at + length] = ds.doc_ids_range(start, start + length) + offset
                else:  # consecutive per row, unique per draw: objectives read EOS as "next document"
                    doc_ids[r, at : at + length] = sample_id * window + k
                at += length
        source_ids = np.array([self.names.index(name) for name, _ in rows], dtype=np.int64)
        return Batch(tokens, doc_ids, np.asarray(ids, dtype=np.int64), source_ids)

    def stats(self) -> dict[str, Any]:
        """Tokens drawn per source, their realised shares, and the cropped share (best_fit)."""
        st = self.state
        total = max(st["tokens"], 1)
        return {
            "tokens": st["tokens"],
            "source_tokens": dict(st["source_tokens"]),
            "source_share": {n: t / total for n, t in st["source_tokens"].items()},
            "row_fill": 1.0,  # rows are always full: greedy windows, best-fit with cropped fill
            "cropped_share": st["cropped"] / max(st["cropped"] + st["tokens"], 1),
            "stage": st["stage"],
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 2,
            "seed": self.seed,
            "packing": self.packing,
            "windows": [s.window for s in self.stages],
            "fingerprints": {n: self.sources[n].fingerprint for n in self.names},
            **copy.deepcopy(self.state),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; batch_size and world_size may differ from the loader that saved it."""
        if state.get("version") != 2:
            raise ValueError("loader state is from an older lmforge (one token stream per split); "
                             "start a new run or re-train from step 0")
        if state["windows"] != [s.window for s in self.stages] or state["packing"] != self.packing:
            raise ValueError(
                f"loader state was saved with windows {state['windows']} and packing {state['packing']!r}, this "
                f"loader has {[s.window for s in self.stages]} and {self.packing!r}; the sample sequence would "
                "differ (did train.seq_len, the curriculum, the objective or tokens.packing change?)"
            )
        mine = {n: self.sources[n].fingerprint for n in self.names}
        if state["fingerprints"] != mine:
            raise ValueError(
                f"loader state was saved for other token sets (fingerprints {state['fingerprints']}) than these "
                f"({mine}); cannot resume exactly"
            )
        if int(state["seed"]) != self.seed:
            self.seed, self._streams = int(state["seed"]), {}  # streams key their shuffles by the seed
        keys = ("stage", "stage_start", "draws", "tokens", "cropped", "credits", "cursors", "source_tokens")
        self.state = copy.deepcopy({k: state[k] for k in keys})


def _read_windows(dataset: TokenDataset, starts: np.ndarray, width: int, sample_ids: np.ndarray) -> Batch:
    tokens = np.stack([dataset.tokens(int(s), int(s) + width) for s in starts]).astype(np.int64)
    doc_ids = dataset.doc_index(starts[:, None] + np.arange(width))
    return Batch(tokens, doc_ids, np.asarray(sample_ids, dtype=np.int64))


def sequential_windows(
    dataset: TokenDataset, window: int, batch_size: int, max_tokens: int = 0, tail: bool = True
) -> Iterator[Batch]:
    """In-order windows at stride window-1 over the first max_tokens tokens (0: all), for evaluation;
    a window's sample id is its number.

    Every token after the first is a target exactly once: full windows come in batches of
    batch_size (the last batch may be smaller), then, with `tail`, any shorter remainder as one final
    [1, k] row (objectives that need full windows pass tail=False).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_tokens = min(dataset.n_tokens, max_tokens) if max_tokens > 0 else dataset.n_tokens
    n_full = n_windows(n_tokens, window)
    stride = window - 1
    for first in range(0, n_full, batch_size):
        numbers = np.arange(first, min(first + batch_size, n_full), dtype=np.int64)
        yield _read_windows(dataset, numbers * stride, window, numbers)
    tail_start = n_full * stride
    if tail and n_tokens - tail_start >= 2:  # one input and one target at least
        yield _read_windows(dataset, np.array([tail_start], dtype=np.int64), n_tokens - tail_start, [n_full])
