"""Batches of token windows drawn from a mixture of sources: deterministic, stateful, resumable.

Each source is a token set (one per source of the split). Per source, samples come in one of two
packings (the samplers are in sources.py):
- `greedy`: sample k is the window of `window` tokens starting at k*(window-1) of the source's
  stream (consecutive samples share one token, so every token after the first is a next-token
  target once per epoch); rows cross documents.
- `best_fit`: every row is BOS-aligned: position 0 holds EOS (the document-start context every
  other document gets from the EOS before it, and generation from `document_start()`), and the
  other window-1 positions are packed from whole documents. Documents are taken in blocks (in the
  epoch's shuffled order); each row is filled with the longest document that still fits, and when
  none fits, with the head of the shortest one longer than the gap, whose tail is cropped; rows are
  always full (100% utilisation), the cropped share is counted. A document longer than window-1 is
  cropped to it, or with `long_docs: split` cut into pieces of that size (a row opening on a
  continuation piece has the token before it at position 0 instead of EOS: real context, not a
  false document start). A block's last, unfilled row is dropped and counted as cropped.
Sources are interleaved by smooth weighted round-robin on their token weights (mixture.py), so
every prefix of the run matches the mixture to within two rows per source. Samples are shuffled by a keyed Feistel
permutation (O(1) memory). The state (stage, per-source cursors, round-robin credits, draws) is
global, so a resume continues the same global batches on any number of ranks; a global batch is
batch_size * world_size consecutive draws and rank r takes rows [r*batch_size, (r+1)*batch_size).

Epochs per source (`stats()["epochs"]`) are the source tokens consumed (drawn, plus those the packing
gave up: best_fit's cropped tails, greedy's uncovered stream tail) over the source's token count, so
one full pass is 1.0; passes at several windows (curriculum stages changing seq_len) add up. Each
time a source's epochs pass max_epochs, max_epochs + 1, ... (of the stage drawing it) one warning is
logged: a small source is repeating.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from lmforge.tokens.mixture import SmoothRoundRobin
from lmforge.tokens.shards import TokenDataset
from lmforge.tokens.sources import BestFitSource, GreedySource, n_windows

log = logging.getLogger(__name__)
_SOURCE_STRIDE = 1 << 40  # doc ids of source i live in [i * 2^40, (i + 1) * 2^40): unique across sources


class Batch(NamedTuple):
    """Rows of raw tokens: tokens and doc_ids int64 [B, window]; sample_ids int64 [B], the global draw
    number of each row, which keys the row's objective randomness (so the noise a sample gets does
    not depend on rank, world size or resume); source_ids int64 [B], the row's source index.

    A document's tokens share one id and its closing EOS carries that id too (objectives move it to
    the next document with `separator_segments`). In best_fit rows the ids are synthetic and unique
    per draw: with base = sample_id * (window + 1), the leading EOS has base and piece k base + 1 + k,
    so after `separator_segments` the leading EOS joins the first piece like every other EOS (a
    `split` continuation row's leading context token has base + 1, the first piece's id)."""

    tokens: np.ndarray
    doc_ids: np.ndarray
    sample_ids: np.ndarray
    source_ids: np.ndarray | None = None


@dataclass
class Stage:
    """A curriculum stage: `tokens` drawn (0 = until the run ends) with its window and weights;
    `max_epochs` (None: the loader's) is the epochs per source past which its draws warn."""

    tokens: int
    window: int
    weights: dict[str, float]
    max_epochs: float | None = None


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
                if w > 0:  # fail now, not hours in at a stage switch, on a source too small for its window
                    stream = self._stream(name, stage.window)
                    if isinstance(stream, BestFitSource):
                        stream.check_fills_a_row()
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
                "cursors": {}, "source_tokens": {n: 0 for n in self.names}, "consumed": {n: 0 for n in self.names}}

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
        pieces, consumed, cropped = stream.take(cursor)
        st = self.state
        before, st["consumed"][name] = st["consumed"][name], st["consumed"][name] + consumed
        max_epochs = self.max_epochs if stage.max_epochs is None else stage.max_epochs
        if max_epochs > 0:
            n_tokens = self.sources[name].n_tokens
            passed = _thresholds_passed(st["consumed"][name] / n_tokens, max_epochs)
            if passed > _thresholds_passed(before / n_tokens, max_epochs):
                log.warning("source %r has now drawn more than %g epochs of its tokens (max_epochs %g): a small "
                            "source is repeating", name, max_epochs + passed - 1, max_epochs)
        st["cropped"] += cropped
        st["draws"] += 1
        st["tokens"] += stage.window
        st["source_tokens"][name] += stage.window
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
            ds = self.sources[name]
            if self.packing == "greedy":
                ((start, length),) = pieces
                tokens[r] = ds.tokens(start, start + length)
                doc_ids[r] = ds.doc_ids_range(start, start + length) + self.names.index(name) * _SOURCE_STRIDE
                continue
            # Position 0: the stream token before the first piece, i.e. the EOS closing the previous
            # document (the stream's first document gets one written here); a `split` continuation
            # piece gets its own preceding token instead, and keeps it in its segment. Ids: see Batch.
            base, eos = sample_id * (window + 1), self._stream(name, window).eos
            (start, length), at = pieces[0], 1 + pieces[0][1]
            if start:
                tokens[r, :at] = ds.tokens(start - 1, start + length)
            else:
                tokens[r, 0], tokens[r, 1:at] = eos, ds.tokens(0, length)
            doc_ids[r, 0], doc_ids[r, 1:at] = base + (tokens[r, 0] != eos), base + 1
            for k, (start, length) in enumerate(pieces[1:], 2):
                tokens[r, at : at + length] = ds.tokens(start, start + length)
                doc_ids[r, at : at + length] = base + k
                at += length
        source_ids = np.array([self.names.index(name) for name, _ in rows], dtype=np.int64)
        return Batch(tokens, doc_ids, np.asarray(ids, dtype=np.int64), source_ids)

    def stats(self) -> dict[str, Any]:
        """Tokens drawn per source, their realised shares, epochs per source (see the module
        docstring) and the cropped share (best_fit: cropped tokens over the source tokens consumed)."""
        st = self.state
        total = max(st["tokens"], 1)
        return {
            "tokens": st["tokens"],
            "source_tokens": dict(st["source_tokens"]),
            "source_share": {n: t / total for n, t in st["source_tokens"].items()},
            "epochs": {n: st["consumed"][n] / self.sources[n].n_tokens for n in self.names},
            "row_fill": 1.0,  # rows are always full: greedy windows, best-fit with cropped fill
            "cropped_share": st["cropped"] / max(sum(st["consumed"].values()), 1),
            "stage": st["stage"],
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 3,
            "seed": self.seed,
            "packing": self.packing,
            "windows": [s.window for s in self.stages],
            "fingerprints": {n: self.sources[n].fingerprint for n in self.names},
            **copy.deepcopy(self.state),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; batch_size and world_size may differ from the loader that saved it."""
        version = state.get("version")
        if version not in (2, 3):
            raise ValueError("loader state is from an older lmforge (one token stream per split); start a new "
                             "run or re-train from step 0" if not isinstance(version, int) or version < 2 else
                             f"loader state version {version} is from a newer lmforge (this one reads 2 and 3)")
        if state["windows"] != [s.window for s in self.stages] or state["packing"] != self.packing:
            raise ValueError(
                f"loader state was saved with windows {state['windows']} and packing {state['packing']!r}, this "
                f"loader has {[s.window for s in self.stages]} and {self.packing!r}; the sample sequence would "
                "differ (did train.seq_len, the curriculum, the objective or tokens.packing change?)"
            )
        # Version 2 fingerprinted the totals only (see TokenDataset.legacy_fingerprint).
        mine = {n: self.sources[n].legacy_fingerprint if version == 2 else self.sources[n].fingerprint
                for n in self.names}
        if state["fingerprints"] != mine:
            raise ValueError(
                f"loader state was saved for other token sets (fingerprints {state['fingerprints']}) than these "
                f"({mine}); cannot resume exactly"
            )
        if int(state["seed"]) != self.seed:
            self.seed, self._streams = int(state["seed"]), {}  # streams key their shuffles by the seed
        keys = ("stage", "stage_start", "draws", "tokens", "cropped", "credits", "cursors", "source_tokens")
        self.state = copy.deepcopy({k: state[k] for k in keys})
        self.state["consumed"] = dict(state["consumed"]) if version == 3 else self._consumed_from_cursors()

    def _consumed_from_cursors(self) -> dict[str, int]:
        """Version 2 states have no per-source consumption: rebuilt from the cursors (exact for greedy;
        best_fit rows of version 2 had no leading EOS, so its cursors land near, not exactly at, the
        place the old layout had reached)."""
        if self.packing == "best_fit":
            log.warning("loader state from an older lmforge: best_fit rows now begin with EOS, so the resumed "
                        "rows continue from the same block but not exactly where the old layout stopped")
        consumed = {n: 0 for n in self.names}
        for key, cursor in self.state["cursors"].items():
            name, _, window = key.rpartition("@")
            consumed[name] += self._stream(name, int(window)).consumed_before(cursor)
        return consumed


def _thresholds_passed(epochs: float, max_epochs: float) -> int:
    """How many of max_epochs, max_epochs + 1, ... `epochs` is past."""
    return 0 if epochs <= max_epochs else math.ceil(epochs - max_epochs)


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
