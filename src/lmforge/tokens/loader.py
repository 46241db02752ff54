"""Packed, shuffled, resumable batches of token windows.

Sample k is the window of `window` tokens starting at k*(window-1): consecutive samples share one
token, so every token after the first is a next-token target exactly once per epoch. The loader's
position is one global sample counter, so resuming on any number of ranks continues the same
sequence of global batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from lmforge.tokens.shards import TokenDataset


class Batch(NamedTuple):
    """Rows of raw tokens: tokens and doc_ids int64 [B, window]; sample_ids int64 [B], the global id of
    each row (epoch * samples per epoch + sample), which keys the row's objective randomness, so the
    noise a sample gets does not depend on rank, world size or resume."""

    tokens: np.ndarray
    doc_ids: np.ndarray
    sample_ids: np.ndarray


def n_windows(n_tokens: int, window: int) -> int:
    """Number of full windows at stride window-1 in a stream of n_tokens."""
    if window < 2:
        raise ValueError(f"window must be >= 2 (inputs plus one target), got {window}")
    return 0 if n_tokens < window else (n_tokens - window) // (window - 1) + 1


class PackedLoader:
    """Batches [batch_size, window] of tokens and document ids for one rank.

    A global batch is batch_size*world_size consecutive samples of the epoch's permutation; rank r
    takes rows [r*batch_size, (r+1)*batch_size). A batch that crosses the end of an epoch continues
    into the next one, so every epoch still yields each sample exactly once.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        window: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        self.n_samples = n_windows(dataset.n_tokens, window)
        if self.n_samples == 0:
            raise ValueError(
                f"token dataset {dataset.out_dir}/{dataset.name} has {dataset.n_tokens} tokens, "
                f"fewer than one window of {window}; add data or lower train.seq_len"
            )
        self.dataset = dataset
        self.window = window
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.index = 0  # next sample of the epoch's permutation, counted over all ranks
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_samples)
            self._perm_epoch = epoch
        return self._perm

    def _take_global(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The next `count` sample numbers and their global ids, advancing the position (and epoch)."""
        taken, ids = [], []
        while count:
            perm = self._permutation(self.epoch)
            part = perm[self.index : self.index + count]
            taken.append(part)
            ids.append(part + self.epoch * self.n_samples)
            count -= part.size
            self.index += part.size
            if self.index == self.n_samples:
                self.epoch += 1
                self.index = 0
        return np.concatenate(taken), np.concatenate(ids)

    def next_batch(self) -> Batch:
        """This rank's rows of the next global batch: tokens, doc_ids [batch_size, window], sample_ids."""
        samples, ids = self._take_global(self.batch_size * self.world_size)
        rows = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return _read_windows(self.dataset, samples[rows] * (self.window - 1), self.window, ids[rows])

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "index": self.index,
            "window": self.window,
            "n_samples": self.n_samples,
            "dataset_fingerprint": self.dataset.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; batch_size and world_size may differ from the loader that saved it."""
        if state["window"] != self.window:
            raise ValueError(
                f"loader state was saved with window {state['window']}, this loader has {self.window}; "
                "the sample sequence would differ (did train.seq_len or the objective change?)"
            )
        if state["n_samples"] != self.n_samples or state["dataset_fingerprint"] != self.dataset.fingerprint:
            raise ValueError(
                f"loader state was saved for a different token dataset ({state['n_samples']} samples, "
                f"fingerprint {state['dataset_fingerprint']}) than {self.dataset.out_dir}/{self.dataset.name} "
                f"({self.n_samples} samples, fingerprint {self.dataset.fingerprint}); cannot resume exactly"
            )
        if not 0 <= state["index"] < self.n_samples or state["epoch"] < 0:
            raise ValueError(f"loader state position epoch={state['epoch']} index={state['index']} is invalid")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self._perm_epoch = -1  # the seed may have changed


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
