"""Helpers every objective uses to respect document boundaries inside packed rows."""

from __future__ import annotations

import numpy as np


def separator_segments(tokens: np.ndarray, doc_ids: np.ndarray, eos_id: int) -> np.ndarray:
    """Segment ids [B, T] (>= 1) for packed rows where each document is followed by EOS.

    The EOS after document d starts document d+1 in attention terms: it is the token that predicts
    the next document's first token, so it must see nothing of the document it closes. The ids are
    renumbered from 1 per row so 0 stays free for padding."""
    shifted = doc_ids.astype(np.int64) + (tokens == eos_id)
    return shifted - shifted[:, :1] + 1


def segment_positions(segment_ids: np.ndarray) -> np.ndarray:
    """Position ids [B, T] that restart at 0 where the segment id changes (padding included)."""
    B, T = segment_ids.shape
    idx = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T))
    starts = np.ones((B, T), dtype=bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    last_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    return idx - last_start


def document_spans(doc_ids_row: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of equal doc ids in one row."""
    if doc_ids_row.size == 0:
        return []
    cuts = np.flatnonzero(np.diff(doc_ids_row)) + 1
    bounds = np.concatenate(([0], cuts, [doc_ids_row.size]))
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
