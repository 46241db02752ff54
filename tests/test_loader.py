"""PackedLoader and sequential_windows over a position-coded dataset.

Token at stream position p is p + 1, except at document ends, which hold EOS (0). No document is
empty, so every window of 2+ tokens holds a non-EOS token, and that token tells where the window
starts: this lets the tests check sample coverage from the loader's public output alone.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.tokenizer.special_tokens import EOS_ID
from lmforge.tokens.loader import PackedLoader, n_windows, sequential_windows
from lmforge.tokens.shard_writer import ShardWriter
from lmforge.tokens.shards import TokenDataset

N_TOKENS = 600
VOCAB = 1 << 20


def write_position_coded(out_dir, name: str, n_tokens: int, seed: int, max_shard_tokens: int) -> TokenDataset:
    rng = np.random.default_rng(seed)
    with ShardWriter(out_dir, name, "0" * 64, VOCAB, max_shard_tokens=max_shard_tokens) as writer:
        pos = 0
        while pos < n_tokens:
            n = int(min(rng.integers(1, 40), n_tokens - pos))  # text tokens + the EOS the writer appends
            text_len = max(n - 1, 1)
            writer.add(np.arange(pos + 1, pos + 1 + text_len), source=f"s{rng.integers(3)}", n_bytes=3 * text_len)
            pos += text_len + 1
    return TokenDataset(out_dir, name)


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> TokenDataset:
    # Small shards so windows often straddle shard boundaries.
    return write_position_coded(tmp_path_factory.mktemp("loader"), "train", N_TOKENS, seed=0, max_shard_tokens=150)


def row_start(row: np.ndarray) -> int:
    j = int(np.flatnonzero(row != EOS_ID)[0])
    return int(row[j]) - 1 - j


def global_batches(
    ds: TokenDataset, window: int, batch_size: int, world_size: int, seed: int, steps: int, state: dict | None = None
) -> list[np.ndarray]:
    """Per step, every rank's token rows stacked in rank order."""
    loaders = [PackedLoader(ds, window, batch_size, seed, rank=r, world_size=world_size) for r in range(world_size)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    return [np.concatenate([loader.next_batch()[0] for loader in loaders]) for _ in range(steps)]


windows = st.integers(2, 48)
batch_sizes = st.integers(1, 6)
world_sizes = st.integers(1, 4)
seeds = st.integers(0, 2**32 - 1)


def test_dataset_is_position_coded(ds):
    stream = ds.tokens(0, ds.n_tokens).astype(np.int64)
    text = stream != EOS_ID
    assert np.array_equal(stream[text], np.flatnonzero(text) + 1)
    assert len(ds.shards) > 2


@settings(max_examples=40, deadline=None)
@given(window=windows, batch_size=batch_sizes, seed=seeds)
def test_same_seed_same_batches(ds, window, batch_size, seed):
    a = PackedLoader(ds, window, batch_size, seed)
    b = PackedLoader(ds, window, batch_size, seed)
    for _ in range(5):
        (ta, da, *_), (tb, db, *_) = a.next_batch(), b.next_batch()
        assert ta.shape == da.shape == (batch_size, window)
        assert ta.dtype == da.dtype == np.int64
        assert np.array_equal(ta, tb) and np.array_equal(da, db)


@settings(max_examples=30, deadline=None)
@given(window=windows, batch_size=batch_sizes, world_size=world_sizes, seed=seeds)
def test_each_epoch_covers_every_sample_once(ds, window, batch_size, world_size, seed):
    n_samples = n_windows(ds.n_tokens, window)
    g = batch_size * world_size
    steps = -(-2 * n_samples // g)  # two epochs, the boundary usually inside a global batch
    rows = np.concatenate(global_batches(ds, window, batch_size, world_size, seed, steps))
    starts = np.array([row_start(r) for r in rows])
    expected = np.arange(n_samples) * (window - 1)
    for epoch in (0, 1):
        got = starts[epoch * n_samples : (epoch + 1) * n_samples]
        assert np.array_equal(np.sort(got), expected)
    for row, start in zip(rows, starts, strict=True):
        assert np.array_equal(row, ds.tokens(int(start), int(start) + window))
    if n_samples > 3:  # a fresh permutation per epoch (equal by chance with probability 1/n_samples!)
        assert not np.array_equal(starts[:n_samples], starts[n_samples : 2 * n_samples])


@settings(max_examples=40, deadline=None)
@given(window=windows, batch_size=batch_sizes, world_size=world_sizes, seed=seeds, data=st.data())
def test_resume_at_any_step_equals_uninterrupted(ds, window, batch_size, world_size, seed, data):
    steps = data.draw(st.integers(1, 30))
    at = data.draw(st.integers(0, steps))
    full = global_batches(ds, window, batch_size, world_size, seed, steps)
    loader = PackedLoader(ds, window, batch_size, seed, rank=0, world_size=world_size)
    for _ in range(at):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # what a checkpoint stores
    resumed = global_batches(ds, window, batch_size, world_size, seed=seed + 1, steps=steps - at, state=state)
    for a, b in zip(full[at:], resumed, strict=True):
        assert np.array_equal(a, b)


@settings(max_examples=40, deadline=None)
@given(window=windows, seed=seeds, data=st.data())
def test_resume_with_other_world_size_continues_the_global_sample_stream(ds, window, seed, data):
    b1, w1 = data.draw(batch_sizes), data.draw(world_sizes)
    b2, w2 = data.draw(batch_sizes), data.draw(world_sizes)
    at = data.draw(st.integers(0, 12))
    after = data.draw(st.integers(1, 12))
    reference = np.concatenate(global_batches(ds, window, 1, 1, seed, at * b1 * w1 + after * b2 * w2))

    loaders = [PackedLoader(ds, window, b1, seed, rank=r, world_size=w1) for r in range(w1)]
    first = [np.concatenate([ld.next_batch()[0] for ld in loaders]) for _ in range(at)]
    state = loaders[0].state_dict()
    assert all(ld.state_dict() == state for ld in loaders)  # ranks agree on the global position
    second = global_batches(ds, window, b2, w2, seed, after, state=state)
    got = np.concatenate(first + second) if first or second else np.zeros((0, window))
    assert np.array_equal(got, reference)


@settings(max_examples=40, deadline=None)
@given(window=windows, batch_size=batch_sizes, world_size=world_sizes, seed=seeds)
def test_ranks_partition_each_global_batch(ds, window, batch_size, world_size, seed):
    ranks = [PackedLoader(ds, window, batch_size, seed, rank=r, world_size=world_size) for r in range(world_size)]
    whole = PackedLoader(ds, window, batch_size * world_size, seed)
    for _ in range(4):
        parts = [ld.next_batch() for ld in ranks]
        tokens, doc_ids, sample_ids, _ = whole.next_batch()
        assert np.array_equal(np.concatenate([p[0] for p in parts]), tokens)
        assert np.array_equal(np.concatenate([p[1] for p in parts]), doc_ids)
        # The key of each row's objective randomness does not depend on the rank count either.
        assert np.array_equal(np.concatenate([p.sample_ids for p in parts]), sample_ids)


@settings(max_examples=40, deadline=None)
@given(window=windows, batch_size=batch_sizes, seed=seeds)
def test_doc_ids_change_exactly_after_eos(ds, window, batch_size, seed):
    loader = PackedLoader(ds, window, batch_size, seed)
    for _ in range(4):
        tokens, doc_ids, *_ = loader.next_batch()
        changes = doc_ids[:, 1:] != doc_ids[:, :-1]
        assert np.array_equal(changes, tokens[:, :-1] == EOS_ID)
        assert np.all(np.diff(doc_ids, axis=1) >= 0)
        for row, ids in zip(tokens, doc_ids, strict=True):
            start = row_start(row)
            assert np.array_equal(ids, ds.doc_index(np.arange(start, start + window)))


@settings(max_examples=40, deadline=None)
@given(window=st.integers(2, 700), batch_size=batch_sizes, max_tokens=st.sampled_from([0, 1, 2, 57, 599, 10_000]))
def test_sequential_windows_cover_the_stream_once(ds, window, batch_size, max_tokens):
    n = min(ds.n_tokens, max_tokens) if max_tokens else ds.n_tokens
    batches = list(sequential_windows(ds, window, batch_size, max_tokens))
    rows = [(t, d) for tokens, doc_ids, *_ in batches for t, d in zip(tokens, doc_ids, strict=True)]
    assert all(len(tokens) <= batch_size for tokens, *_ in batches)
    assert all(len(t) == window for t, _ in rows[:-1])
    if n < 2:
        assert rows == []
        return
    # Consecutive rows share one token; dropping it rebuilds the stream exactly, each target once.
    stream = np.concatenate([rows[0][0]] + [t[1:] for t, _ in rows[1:]])
    doc_ids = np.concatenate([rows[0][1]] + [d[1:] for _, d in rows[1:]])
    assert np.array_equal(stream, ds.tokens(0, n))
    assert np.array_equal(doc_ids, ds.doc_index(np.arange(n)))
    assert sum(len(t) - 1 for t, _ in rows) == n - 1


def test_state_dict_is_plain_json(ds):
    loader = PackedLoader(ds, 16, 4, seed=7, world_size=2)
    for _ in range(3):
        loader.next_batch()
    state = loader.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert state["cursors"] == {"train@16": {"epoch": 0, "index": 24}} and state["windows"] == [16]
    assert (state["draws"], state["tokens"]) == (24, 24 * 16)
    assert loader.n_samples == n_windows(ds.n_tokens, 16) == (ds.n_tokens - 16) // 15 + 1


def test_epoch_rolls_over(ds):
    loader = PackedLoader(ds, 200, 1, seed=0)  # 3 samples
    assert loader.n_samples == 3
    for _ in range(4):
        loader.next_batch()
    assert loader.state_dict()["cursors"]["train@200"] == {"epoch": 1, "index": 1}


def test_dataset_smaller_than_one_window(ds):
    with pytest.raises(ValueError, match=f"{ds.n_tokens} tokens, fewer than one window of {ds.n_tokens + 1}"):
        PackedLoader(ds, ds.n_tokens + 1, 1, seed=0)
    assert PackedLoader(ds, ds.n_tokens, 1, seed=0).n_samples == 1


def test_bad_arguments(ds):
    with pytest.raises(ValueError, match="window must be >= 2"):
        PackedLoader(ds, 1, 1, seed=0)
    with pytest.raises(ValueError, match="rank 2 outside"):
        PackedLoader(ds, 8, 1, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        PackedLoader(ds, 8, 0, seed=0)


def test_resume_refuses_other_window(ds):
    state = PackedLoader(ds, 16, 2, seed=0).state_dict()
    with pytest.raises(ValueError, match=r"windows \[16\] and packing 'greedy', this loader has \[32\]"):
        PackedLoader(ds, 32, 2, seed=0).load_state_dict(state)


def test_resume_refuses_other_dataset(ds, tmp_path):
    state = PackedLoader(ds, 16, 2, seed=0).state_dict()
    other = write_position_coded(tmp_path, "train", N_TOKENS, seed=1, max_shard_tokens=150)
    with pytest.raises(ValueError, match="other token sets"):
        PackedLoader(other, 16, 2, seed=0).load_state_dict(state)


def test_resume_accepts_same_stream_sharded_differently(ds, tmp_path):
    loader = PackedLoader(ds, 16, 2, seed=3)
    loader.next_batch()
    state = loader.state_dict()
    resharded = write_position_coded(tmp_path, "train", N_TOKENS, seed=0, max_shard_tokens=10_000)
    assert len(resharded.shards) == 1
    resumed = PackedLoader(resharded, 16, 2, seed=3)
    resumed.load_state_dict(state)
    for _ in range(3):
        assert np.array_equal(resumed.next_batch()[0], loader.next_batch()[0])


def test_sample_ids_are_unique_and_new_each_epoch(ds) -> None:
    loader = PackedLoader(ds, 9, 4, seed=3)
    seen = np.concatenate([loader.next_batch().sample_ids for _ in range(3 * loader.n_samples // 4)])
    assert len(set(seen.tolist())) == len(seen)  # an epoch's repeat of a window gets a new id (new noise)
    assert set((seen % loader.n_samples).tolist()) == set(range(loader.n_samples))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_doc_ids_of_a_range_equal_a_lookup_per_token(ds, data):
    start = data.draw(st.integers(0, ds.n_tokens))
    stop = data.draw(st.integers(start, ds.n_tokens))
    assert np.array_equal(ds.doc_ids_range(start, stop), ds.doc_index(np.arange(start, stop)))
