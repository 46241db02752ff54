"""Token sets per source, mixtures, best-fit packing, curricula and the loader state that carries them.

Datasets are position-coded as in test_loader: the token at stream position p is p + 1 (documents
end with EOS = 0), so any row tells where each of its pieces came from."""

from __future__ import annotations

import functools
import json
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_loader import write_position_coded

from lmforge.data.document import Document
from lmforge.errors import ConfigError
from lmforge.objectives.packing import document_spans, separator_segments
from lmforge.tokenizer.special_tokens import EOS_ID
from lmforge.tokens import token_sets
from lmforge.tokens.loader import PackedLoader, Stage
from lmforge.tokens.mixture import SmoothRoundRobin, resolve_weights
from lmforge.tokens.permutation import Permutation
from lmforge.tokens.shard_writer import doc_batches
from lmforge.tokens.shards import TokenDataset
from lmforge.tokens.sources import BestFitSource, pack_best_fit
from lmforge.tokens.token_sets import open_split, tokenize_split


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, TokenDataset]:
    root = tmp_path_factory.mktemp("mix")
    sizes = {"web": 3000, "code": 1200, "zh": 400}
    return {n: write_position_coded(root / n, n, size, seed=i, max_shard_tokens=500)
            for i, (n, size) in enumerate(sizes.items())}


# ---------------------------------------------------------------- weights


def test_temperature_weights_follow_n_to_the_one_over_t() -> None:
    sizes = {"a": 900, "b": 100, "c": 0}
    assert resolve_weights(sizes, {}, 1.0) == pytest.approx({"a": 0.9, "b": 0.1})
    flat = resolve_weights(sizes, {}, 2.0)
    assert flat == pytest.approx({"a": 30 / 40, "b": 10 / 40})  # sqrt(900) : sqrt(100)
    assert "c" not in flat  # a source without tokens draws nothing


def test_bad_weights_are_clear_errors() -> None:
    sizes = {"a": 10, "b": 5, "empty": 0}
    with pytest.raises(ConfigError, match=r"tokens.mixture.weights.nope: no such source; .*\['a', 'b', 'empty'\]"):
        resolve_weights(sizes, {"nope": 1.0})
    with pytest.raises(ConfigError, match=r"weights.a: must be a number >= 0 \(got -0.5\)"):
        resolve_weights(sizes, {"a": -0.5, "b": 1.5})
    with pytest.raises(ConfigError, match="weights.empty: the source has no tokens"):
        resolve_weights(sizes, {"a": 0.5, "empty": 0.5})
    with pytest.raises(ConfigError, match="temperature: must be > 0"):
        resolve_weights(sizes, {}, 0.0)
    with pytest.warns(UserWarning, match="weights sum to 3, not 1; normalised"):
        assert resolve_weights(sizes, {"a": 2, "b": 1}) == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_weights(sizes, {"a": 0.25, "b": 0.75}) == {"a": 0.25, "b": 0.75}


@settings(max_examples=30, deadline=None)
@given(raw=st.lists(st.floats(0.01, 10), min_size=1, max_size=6), n=st.integers(1, 3000))
def test_round_robin_keeps_every_prefix_within_two_draws(raw: list[float], n: int) -> None:
    weights = {f"s{i}": w / sum(raw) for i, w in enumerate(raw)}
    rr = SmoothRoundRobin(weights)
    drawn = {name: 0 for name in weights}
    for k in range(1, n + 1):
        drawn[rr.choose()] += 1
        for name, w in weights.items():
            assert abs(drawn[name] - k * w) < 2.0


def test_realised_token_shares_match_the_weights_over_10m_tokens(sources) -> None:
    weights = {"web": 0.5, "code": 0.3, "zh": 0.2}
    loader = PackedLoader(sources, 256, 64, seed=0, weights=weights, max_epochs=0)
    rows = np.zeros(3, dtype=np.int64)  # counted from the batches, not only from the loader's bookkeeping
    while loader.state["tokens"] < 10_000_000:
        rows += np.bincount(loader.next_batch().source_ids, minlength=3)
    stats = loader.stats()
    assert stats["tokens"] >= 10_000_000 and rows.sum() * 256 == stats["tokens"]
    for name, w in weights.items():
        assert abs(stats["source_share"][name] - w) < 0.01, (name, stats["source_share"])
        assert abs(rows[loader.names.index(name)] / rows.sum() - w) < 0.01


def test_rows_carry_their_source_and_tokens_of_that_source(sources) -> None:
    loader = PackedLoader(sources, 32, 16, seed=1, weights={"web": 0.6, "zh": 0.4})
    batch = loader.next_batch()
    names = loader.names
    assert set(batch.source_ids.tolist()) == {names.index("web"), names.index("zh")}
    for row, src, ids in zip(batch.tokens, batch.source_ids, batch.doc_ids, strict=True):
        ds = sources[names[src]]
        j = int(np.flatnonzero(row != EOS_ID)[0])
        start = int(row[j]) - 1 - j
        assert np.array_equal(row, ds.tokens(start, start + 32))
        assert np.array_equal(ids >> 40, np.full(32, src))  # doc ids are unique across sources


# ---------------------------------------------------------------- permutation


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000), key=st.tuples(st.integers(0, 2**32), st.integers(0, 9)))
def test_permutation_is_a_bijection(n: int, key: tuple[int, int]) -> None:
    out = Permutation(n, key)(np.arange(n))
    assert np.array_equal(np.sort(out), np.arange(n))
    assert n < 8 or not np.array_equal(out, np.arange(n))


def test_an_epoch_sees_every_window_once_across_ranks(sources) -> None:
    ds = sources["code"]
    ranks = [PackedLoader(ds, 16, 3, seed=5, rank=r, world_size=4) for r in range(4)]
    n = ranks[0].n_samples
    starts = []
    for _ in range(-(-n // 12)):
        for loader in ranks:
            for row in loader.next_batch().tokens:
                j = int(np.flatnonzero(row != EOS_ID)[0])
                starts.append(int(row[j]) - 1 - j)
    first_epoch = starts[:n]
    assert sorted(first_epoch) == [k * 15 for k in range(n)]


# ---------------------------------------------------------------- best-fit packing


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 120), min_size=1, max_size=80), window=st.integers(4, 64),
       long_docs=st.sampled_from(["crop", "split"]))
def test_best_fit_rows_are_full_and_every_token_is_accounted_for(lengths, window, long_docs) -> None:
    """The loader packs window-1 tokens behind each row's leading EOS: rows of that capacity are full,
    and pieces drawn plus tokens cropped are exactly the documents' tokens."""
    capacity = window - 1
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).tolist()
    rows, cropped = pack_best_fit(starts, lengths, capacity, long_docs)
    used = [piece for row in rows for piece in row]
    assert all(1 + sum(length for _, length in row) == window for row in rows)  # EOS + pieces fill the window
    assert sum(length for _, length in used) + cropped == sum(lengths)
    doc_of = {s: i for i, s in enumerate(starts)}
    piece_starts = {s + k for s, n in zip(starts, lengths, strict=True) for k in range(0, n, capacity)}
    for row in rows:
        first = row[0][0]
        assert first in doc_of or (long_docs == "split" and first in piece_starts)
    covered = np.zeros(sum(lengths), dtype=int)
    for s, n in used:
        covered[s : s + n] += 1
    assert covered.max() <= 1  # no token is used twice
    if long_docs == "crop":  # a document longer than the row loses at least its overhang
        assert cropped >= sum(max(0, n - capacity) for n in lengths)


def test_a_best_fit_source_too_small_for_a_later_stage_fails_when_the_loader_is_built(sources) -> None:
    """Not hours in at the stage switch: the loader checks every (source, window) its stages draw."""
    stages = [Stage(64, 16, {"code": 1.0}), Stage(0, 500, {"code": 1.0})]  # no 2 documents fill 500 tokens
    with pytest.raises(ValueError, match="fills a row"):
        PackedLoader(sources, 16, 2, seed=0, packing="best_fit", stages=stages, block_docs=2)
    PackedLoader(sources, 16, 2, seed=0, packing="best_fit", stages=stages[:1], block_docs=2)  # the first alone is fine


@settings(max_examples=20, deadline=None)
@given(window=st.integers(2, 80), block_docs=st.sampled_from([1, 7, 40, 1024]), seed=st.integers(0, 99),
       long_docs=st.sampled_from(["crop", "split"]))
def test_best_fit_epoch_draws_plus_crops_every_token_once(sources, window, block_docs, seed, long_docs) -> None:
    """Over one epoch of a best_fit source, the rows' pieces plus the cropped tokens are the source's
    tokens, each used at most once, and what the rows report as consumed adds up to one epoch."""
    ds = sources["code"]
    stream = BestFitSource(ds, window, seed, long_docs, block_docs)
    cursor, covered, consumed, cropped = stream.fresh(), np.zeros(ds.n_tokens, dtype=int), 0, 0
    try:
        while cursor["epoch"] == 0:
            row, used, crop = stream.take(cursor)
            assert sum(n for _, n in row) == window - 1
            for s, n in row:
                covered[s : s + n] += 1
            consumed, cropped = consumed + used, cropped + crop
    except ValueError as e:  # tiny blocks of short documents may never fill a long row
        assert "fills a row" in str(e) and block_docs < 40
        return
    assert covered.max() <= 1 and covered.sum() + cropped == ds.n_tokens == consumed
    assert cursor == {"epoch": 1, "block": 0, "row": 0}  # the epoch's last row closed it


def test_best_fit_loader_rows_start_with_eos_then_documents(sources) -> None:
    ds = sources["web"]
    window = 48
    loader = PackedLoader(ds, window, 8, seed=3, packing="best_fit", block_docs=40)
    doc_starts = set(ds.doc_starts[:-1].tolist())
    for _ in range(6):
        batch = loader.next_batch()
        assert (batch.tokens[:, 0] == EOS_ID).all()  # BOS-aligned: every row opens on the separator
        for row, ids, sample_id in zip(batch.tokens, batch.doc_ids, batch.sample_ids, strict=True):
            assert int(row[1]) - 1 in doc_starts  # position-coded: token p+1 sits at position p
            base = int(sample_id) * (window + 1)
            assert ids[0] == base and ids[1] == base + 1 and ids[-1] < base + window + 1  # unique per draw
            changes = np.flatnonzero(np.diff(ids)) + 1
            assert np.all(np.diff(ids) >= 0) and np.all(np.diff(ids)[changes - 1] == 1)  # consecutive pieces
            for c in changes[1:]:  # a piece that ended early ended with its EOS, then a new document starts
                assert row[c - 1] == EOS_ID and int(row[c]) - 1 in doc_starts
    stats = loader.stats()
    assert stats["row_fill"] == 1.0 and 0.0 < stats["cropped_share"] < 0.5


@settings(max_examples=25, deadline=None)
@given(window=st.integers(3, 90), seed=st.integers(0, 2**16), long_docs=st.sampled_from(["crop", "split"]),
       block_docs=st.sampled_from([20, 1024]))
def test_best_fit_segments_keep_every_token_inside_its_document(sources, window, seed, long_docs, block_docs):
    """separator_segments over best_fit rows: a segment is at most one EOS (its first token) followed
    by consecutive tokens of one document, so attention inside a segment never reaches another
    document; the leading EOS is the first document's segment, as every other EOS is the next one's."""
    ds = sources["code"]
    loader = PackedLoader(ds, window, 4, seed=seed, packing="best_fit", long_docs=long_docs, block_docs=block_docs)
    for _ in range(3):
        batch = loader.next_batch()
        segments = separator_segments(batch.tokens, batch.doc_ids, EOS_ID)
        for row, seg in zip(batch.tokens, segments, strict=True):
            assert seg[0] == seg[1] == 1
            for a, b in document_spans(seg):
                # Every segment opens on its separator, the first included; only a split continuation
                # row opens on the token before its piece (same document: checked below).
                assert row[a] == EOS_ID or (a == 0 and long_docs == "split")
                text = row[a + 1 : b] if row[a] == EOS_ID else row[a:b]
                assert not (text == EOS_ID).any()
                if text.size:
                    positions = text - 1
                    assert np.array_equal(positions, np.arange(positions[0], positions[0] + text.size))
                    assert len(set(ds.doc_index(positions).tolist())) == 1


# ---------------------------------------------------------------- curriculum and resume


def curriculum(sources) -> list[Stage]:
    return [Stage(2000, 16, {"web": 1.0}), Stage(3000, 32, {"code": 0.5, "zh": 0.5}), Stage(0, 24, {"web": 0.2,
            "code": 0.8})]


def run(sources, steps: int, world: int, batch: int, packing: str, state=None, stop_at=None):
    loaders = [PackedLoader(sources, 16, batch, seed=9, rank=r, world_size=world, packing=packing,
                            stages=curriculum(sources), block_docs=30) for r in range(world)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(json.loads(json.dumps(state)))
    out = []
    for step in range(steps):
        if stop_at is not None and step == stop_at:
            return out, loaders[0].state_dict()
        parts = [ld.next_batch() for ld in loaders]
        out.append((np.concatenate([p.tokens for p in parts]), np.concatenate([p.sample_ids for p in parts]),
                    loaders[0].state["stage"]))
    return out, loaders[0].state_dict()


def test_stages_switch_at_the_first_batch_boundary_past_their_budget(sources) -> None:
    steps, _ = run(sources, 40, 1, 8, "greedy")
    widths = [t.shape[1] for t, _, _ in steps]
    # Stage 0: 2000 tokens of 8 x 16 = 128 per batch -> 16 batches (2048 tokens); stage 1: 3000 tokens
    # of 8 x 32 = 256 per batch -> 12 batches (3072 tokens); then stage 2 to the end.
    assert widths == [16] * 16 + [32] * 12 + [24] * 12


@settings(max_examples=25, deadline=None)
@given(packing=st.sampled_from(["greedy", "best_fit"]), at=st.integers(0, 35),
       w1=st.integers(1, 3), w2=st.integers(1, 3))
def test_resume_mid_stage_and_at_boundaries_on_other_rank_counts_equals_uninterrupted(sources, packing, at, w1, w2):
    batch = 12  # the global batch stays 12 rows: 12 x 1, 6 x 2 or 4 x 3
    full, _ = run(sources, 36, 1, batch, packing)
    if batch % w1 or batch % w2:
        return
    _, state = run(sources, 36, w1, batch // w1, packing, stop_at=at)
    rest, _ = run(sources, 36 - at, w2, batch // w2, packing, state=state)
    for (a, ids_a, stage_a), (b, ids_b, stage_b) in zip(full[at:], rest, strict=True):
        assert np.array_equal(a, b) and np.array_equal(ids_a, ids_b) and stage_a == stage_b


# ---------------------------------------------------------------- epochs per source


def draw_rows(loader: PackedLoader, n: int) -> None:
    for _ in range(n):
        loader.next_batch(1)


@pytest.mark.parametrize("packing", ["greedy", "best_fit"])
def test_epochs_per_source_count_the_tokens_consumed(sources, packing) -> None:
    """Greedy: each window consumes window-1 tokens and an epoch's last one the uncovered tail, so n_samples
    rows are exactly 1.0 epoch; best_fit: rows consume window-1 tokens plus what their blocks cropped."""
    ds = sources["zh"]
    loader = PackedLoader(ds, 16, 1, seed=4, packing=packing, block_docs=8, max_epochs=0)
    assert loader.stats()["epochs"] == {"zh": 0.0}
    cursor = lambda: loader.state["cursors"]["zh@16"]  # noqa: E731
    rows = 0
    while not rows or cursor()["epoch"] == 0:
        draw_rows(loader, 1)
        rows += 1
        if cursor()["epoch"] == 0:  # within the epoch: drawn plus cropped so far
            assert loader.stats()["epochs"]["zh"] == (rows * 15 + loader.state["cropped"]) / ds.n_tokens
    assert loader.stats()["epochs"]["zh"] == 1.0  # the epoch's last row closes it exactly
    if packing == "greedy":
        assert rows == loader.n_samples
    cropped = loader.state["cropped"]
    draw_rows(loader, 3)
    assert loader.stats()["epochs"]["zh"] == 1.0 + (3 * 15 + loader.state["cropped"] - cropped) / ds.n_tokens


@pytest.mark.parametrize("packing", ["greedy", "best_fit"])
def test_epochs_add_up_across_curriculum_windows_and_survive_resume(sources, packing) -> None:
    loader = PackedLoader(sources, 16, 8, seed=9, packing=packing, stages=curriculum(sources), block_docs=30)
    for _ in range(40):
        loader.next_batch()
    epochs = loader.stats()["epochs"]
    assert loader.state["stage"] == 2 and epochs["web"] > 0 and epochs["code"] > 0 and epochs["zh"] > 0
    per_cursor = {n: 0.0 for n in loader.names}  # each window's cursor passes over the source on its own
    for key, cursor in loader.state["cursors"].items():
        name, _, window = key.rpartition("@")
        per_cursor[name] += loader._stream(name, int(window)).consumed_before(cursor) / sources[name].n_tokens
    assert epochs == pytest.approx(per_cursor, rel=1e-12)
    assert len([k for k in loader.state["cursors"] if k.startswith("web@")]) == 2  # web at windows 16 and 24

    state = json.loads(json.dumps(loader.state_dict()))
    assert state["version"] == 3
    resumed = PackedLoader(sources, 16, 8, seed=9, packing=packing, stages=curriculum(sources), block_docs=30)
    resumed.load_state_dict(state)
    assert resumed.stats() == loader.stats()
    # As version 2 saved it: no consumed counts, fingerprints of the totals only.
    old = {k: v for k, v in state.items() if k != "consumed"} | {
        "version": 2, "fingerprints": {n: ds.legacy_fingerprint for n, ds in sources.items()}}
    from_v2 = PackedLoader(sources, 16, 8, seed=9, packing=packing, stages=curriculum(sources), block_docs=30)
    from_v2.load_state_dict(old)
    assert from_v2.stats()["epochs"] == pytest.approx(epochs, rel=1e-12)
    for _ in range(5):
        assert np.array_equal(resumed.next_batch().tokens, loader.next_batch().tokens)
        from_v2.next_batch()
    assert resumed.stats() == loader.stats() and from_v2.stats()["epochs"] == pytest.approx(loader.stats()["epochs"])
    for version, match in ((1, "older lmforge"), (None, "older lmforge"), (4, "newer lmforge")):
        with pytest.raises(ValueError, match=match):
            resumed.load_state_dict({**state, "version": version})


def test_repeat_warning_fires_once_per_epoch_past_max_epochs(sources, caplog) -> None:
    ds = sources["zh"]
    loader = PackedLoader(ds, 16, 1, seed=2, max_epochs=2)
    n = loader.n_samples
    caplog.set_level("WARNING", logger="lmforge.tokens.loader")

    def warnings_() -> list[str]:
        return [r.getMessage() for r in caplog.records if "repeating" in r.getMessage()]

    draw_rows(loader, 2 * n)
    assert loader.stats()["epochs"]["zh"] == 2.0 and warnings_() == []  # at max_epochs, not past it
    draw_rows(loader, 1)
    assert warnings_() == ["source 'zh' has now drawn more than 2 epochs of its tokens (max_epochs 2): a small "
                           "source is repeating"]
    draw_rows(loader, n - 1)
    assert len(warnings_()) == 1  # still inside the third epoch
    draw_rows(loader, 1)
    assert len(warnings_()) == 2 and "more than 3 epochs" in warnings_()[1]

    caplog.clear()  # a fractional limit, and each stage's own limit over the loader's
    half = PackedLoader(ds, 16, 1, seed=2, max_epochs=0.5)
    first = ds.n_tokens // 30 + 1  # the first row past half the source's tokens (15 per row)
    draw_rows(half, first - 1)
    assert warnings_() == []
    draw_rows(half, 1)
    assert len(warnings_()) == 1 and "more than 0.5 epochs" in warnings_()[0]
    caplog.clear()
    staged = PackedLoader(ds, 16, 1, seed=2, max_epochs=0, stages=[Stage(0, 16, {"zh": 1.0}, max_epochs=1)])
    draw_rows(staged, n + 1)
    assert len(warnings_()) == 1
    caplog.clear()
    quiet = PackedLoader(ds, 16, 1, seed=2, max_epochs=1, stages=[Stage(0, 16, {"zh": 1.0}, max_epochs=0)])
    draw_rows(quiet, 3 * n)
    assert warnings_() == []


def test_build_loader_gives_each_curriculum_stage_its_own_max_epochs(sources) -> None:
    from types import SimpleNamespace

    from lmforge.config import CurriculumStage, MixtureConfig, TokensConfig
    from lmforge.stages import build_loader

    tokens = TokensConfig(curriculum=[CurriculumStage(100, 0, MixtureConfig({"web": 1.0}, max_epochs=2)),
                                      CurriculumStage(0, 31, MixtureConfig({"zh": 1.0}, max_epochs=0.5))])
    cfg = SimpleNamespace(tokens=tokens, train=SimpleNamespace(seq_len=15, batch_size=2), seed=0)
    loader = build_loader(cfg, sources, SimpleNamespace(window=lambda seq_len: seq_len + 1))
    assert [(s.window, s.max_epochs) for s in loader.stages] == [(16, 2), (32, 0.5)]


def test_run_summary_shows_epochs_next_to_shares() -> None:
    from lmforge.cli import _shares

    line = _shares({"source_share": {"web": 0.75, "zh": 0.25}, "epochs": {"web": 0.1234, "zh": 5.0},
                    "utilisation": 1.0, "cropped_share": 0.1})
    assert line.startswith("web 75.0% (0.12 epochs), zh 25.0% (5.00 epochs);")
    assert _shares({"source_share": {"web": 1.0}, "utilisation": 1.0, "cropped_share": 0.0}).startswith("web 100.0%;")


# ---------------------------------------------------------------- token sets on disk


def docs_by_shard() -> dict[str, list[Document]]:
    rng = np.random.default_rng(0)
    words = ["data", "模型", "token", "数据", "x=1;", "the"]
    return {
        f"shard-{k:05d}": [Document(f"{k}-{i}", " ".join(rng.choice(words, rng.integers(1, 30))),
                                    ["web", "code", "zh"][int(rng.integers(3))]) for i in range(40)]
        for k in range(4)
    }


def encode(texts: list[str]) -> list[list[int]]:
    return [[1 + (b % 250) for b in t.encode("utf-8")] for t in texts]


def tokenize(root, inputs, shards, crash_at: str | None = None, calls: list | None = None, **kwargs) -> dict:
    def read(path):
        if path.name == crash_at:
            raise KeyboardInterrupt("killed")
        if calls is not None:
            calls.append(path.name)
        return iter(shards[path.name])

    return tokenize_split(inputs, read, kwargs.pop("encode", encode), root / "tokens", "train", "f" * 64, 256, EOS_ID,
                          progress=False, **kwargs)


def write_inputs(root, shards: dict[str, list[Document]]) -> list:
    inputs = []
    for name, docs in shards.items():
        path = root / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([d.id for d in docs]))  # content identifies the input for resume
        inputs.append(path)
    return inputs


def test_tokenize_writes_one_set_per_source_and_resumes_only_unfinished_shards(tmp_path) -> None:
    shards = docs_by_shard()
    inputs = write_inputs(tmp_path, shards)
    whole = tokenize(tmp_path / "a", inputs, shards)
    sets = open_split(tmp_path / "a" / "tokens", "train")
    for source, ds in sets.items():
        mine = [d for docs in shards.values() for d in docs if d.source == source]
        stream = np.concatenate([np.array(encode([d.text])[0] + [EOS_ID]) for d in mine])
        assert np.array_equal(ds.tokens(0, ds.n_tokens), stream)
        assert np.array_equal(ds.counts(), np.bincount(stream, minlength=256))
        assert whole["sources"][source]["n_tokens"] == len(stream)
        assert whole["sources"][source]["bytes_per_token"] == pytest.approx(
            sum(d.n_bytes for d in mine) / (len(stream) - len(mine)))

    with pytest.raises(KeyboardInterrupt):
        tokenize(tmp_path / "b", inputs, shards, crash_at="shard-00002")
    with pytest.raises(FileNotFoundError, match="did not finish"):
        open_split(tmp_path / "b" / "tokens", "train")
    calls: list[str] = []
    resumed = tokenize(tmp_path / "b", inputs, shards, calls=calls)
    assert calls == ["shard-00002", "shard-00003"]  # the two finished input shards were not re-read
    assert resumed == whole
    for source in sets:
        a, b = sets[source], open_split(tmp_path / "b" / "tokens", "train")[source]
        assert np.array_equal(a.tokens(0, a.n_tokens), b.tokens(0, b.n_tokens))
        assert np.array_equal(a.counts(), b.counts())


def test_encoder_threads_finishing_out_of_order_write_the_one_thread_bytes(tmp_path, monkeypatch) -> None:
    """Batches of three documents on three threads, each finishing after a random delay: the token
    sets are byte for byte those of one thread, so documents keep their order."""
    monkeypatch.setattr(token_sets, "doc_batches", functools.partial(doc_batches, max_docs=3))
    shards = docs_by_shard()
    inputs = write_inputs(tmp_path, shards)
    delays = iter(np.random.default_rng(0).random(1000) * 0.003)

    def jittery(texts: list[str]) -> list[list[int]]:
        time.sleep(next(delays))
        return encode(texts)

    one = tokenize(tmp_path / "one", inputs, shards)
    with ThreadPoolExecutor(3) as pool:
        many = tokenize(tmp_path / "many", inputs, shards, encode=jittery, encoders=pool, ahead=5)
    assert many == one
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert len(files) > 6
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "many" / f).read_bytes(), f


def test_sets_finish_on_threads_of_their_own_not_the_encoders(tmp_path, monkeypatch) -> None:
    """Finishing a split's sets waits on the disk: on the shared encoder pool that would stall the
    encoding of a split still running beside it (val beside train), so it runs on its own threads."""
    shards = docs_by_shard()
    inputs = write_inputs(tmp_path, shards)
    finished_on: list[str] = []
    exit_ = token_sets.ShardWriter.__exit__

    def recording_exit(self, *exc):
        finished_on.append(threading.current_thread().name)
        return exit_(self, *exc)

    monkeypatch.setattr(token_sets.ShardWriter, "__exit__", recording_exit)
    with ThreadPoolExecutor(2, thread_name_prefix="encode") as pool:
        out = tokenize(tmp_path, inputs, shards, encoders=pool)
    assert len(finished_on) == len(out["sources"]) >= 2
    assert not [name for name in finished_on if name.startswith("encode")]


def test_joined_encoder_writes_the_bytes_of_one_call_per_text(tmp_path) -> None:
    """With `encode_joined` (one call per source and batch, EOS placed by the encoder) the token sets
    are byte for byte those of `encode`, and the joined encoder is the one that ran."""
    shards = docs_by_shard()
    inputs = write_inputs(tmp_path, shards)
    calls = []

    def joined(texts: list[str], sep: int) -> tuple[np.ndarray, list[int]]:
        calls.append(len(texts))
        ids = encode(texts)
        return np.array([t for doc in ids for t in (*doc, sep)], dtype=np.uint32), [len(doc) + 1 for doc in ids]

    def unused(texts: list[str]) -> list[list[int]]:
        raise AssertionError("encode ran although encode_joined was given")

    one = tokenize(tmp_path / "one", inputs, shards)
    both = tokenize(tmp_path / "joined", inputs, shards, encode=unused, encode_joined=joined)
    assert both == one and sum(calls) == sum(len(docs) for docs in shards.values())
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "joined" / f).read_bytes(), f


def test_tokenize_resume_redoes_everything_when_a_finished_input_changed(tmp_path) -> None:
    shards = docs_by_shard()
    inputs = write_inputs(tmp_path, shards)
    whole = tokenize(tmp_path / "a", inputs, shards)
    for change in ("content", "progress"):
        out = tmp_path / change
        with pytest.raises(KeyboardInterrupt):
            tokenize(out, inputs, shards, crash_at="shard-00002")
        progress = out / "tokens" / "train" / "progress.json"
        state = json.loads(progress.read_text())
        assert state["done"] == 2 and [k["name"] for k in state["inputs"]] == ["shard-00000", "shard-00001"]
        if change == "content":  # a finished input is not what was tokenized any more
            inputs[1].write_text(inputs[1].read_text() + " ")
        else:  # a progress file that claims more than there is
            progress.write_text(json.dumps({**state, "done": 9}))
        calls: list[str] = []
        assert tokenize(out, inputs, shards, calls=calls) == whole
        assert calls == list(shards), "every input read again"
