"""Token shards: exact stream and index, dtype choice, rolling, corruption detection."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.config import TokenizerConfig
from lmforge.data.document import Document
from lmforge.tokenizer.special_tokens import EOS, EOS_ID
from lmforge.tokenizer.train import tokenizer_hash, train_tokenizer
from lmforge.tokens.shard_writer import ShardWriter, pack, pack_joined, write_token_shards
from lmforge.tokens.shards import ShardError, TokenDataset, choose_dtype


def make_docs(n: int = 300, seed: int = 0) -> list[Document]:
    rng = random.Random(seed)
    words = ["data", "model", "token", "shard", "the", "of", "and", "pretraining", "数据", "模型", "🤗", "x=1;"]
    sources = ["web", "code", "zh"]
    docs = [
        Document(f"d{i}", " ".join(rng.choices(words, k=rng.randint(1, 40))), rng.choice(sources)) for i in range(n)
    ]
    docs[5] = Document("empty", "", "web")
    docs[7] = Document("quotes-eos", f"a document quoting {EOS} in its text", "code")
    return docs


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    texts = [d.text for d in make_docs(2000, seed=1)]
    return train_tokenizer(texts, TokenizerConfig(vocab_size=400), path, progress=False), path


def expected_stream(tokenizer, docs: list[Document]) -> list[list[int]]:
    tokenizer.encode_special_tokens = True
    try:
        return [tokenizer.encode(d.text).ids + [EOS_ID] for d in docs]
    finally:
        tokenizer.encode_special_tokens = False


def test_stream_index_and_summary_exact(tok, tmp_path):
    tokenizer, path = tok
    docs = make_docs()
    summary = write_token_shards(docs, tokenizer, path, tmp_path, "train", progress=False)
    ds = TokenDataset(tmp_path, "train")
    per_doc = expected_stream(tokenizer, docs)
    stream = np.concatenate([np.array(ids) for ids in per_doc])

    assert np.array_equal(ds.tokens(0, ds.n_tokens), stream)
    assert ds.n_tokens == len(stream) == summary["n_tokens"]
    assert ds.n_docs == len(docs) == summary["n_docs"] == int((stream == EOS_ID).sum())
    assert tokenizer.encode_special_tokens is False  # restored after writing
    for i, (doc, ids) in enumerate(zip(docs, per_doc, strict=True)):
        start, stop = int(ds.doc_starts[i]), int(ds.doc_starts[i + 1])
        assert ds.tokens(start, stop).tolist() == ids
        assert np.all(ds.doc_index(np.arange(start, stop)) == i)
        assert ds.source_names[ds.source_ids[i]] == doc.source
        assert ds.doc_bytes[i] == len(doc.text.encode("utf-8"))
    assert ds.total_bytes == sum(d.n_bytes for d in docs) == summary["n_bytes"]
    assert ds.doc_index(np.array([[0, ds.n_tokens - 1]])).tolist() == [[0, len(docs) - 1]]

    for source in ("web", "code", "zh"):
        mine = [(d, ids) for d, ids in zip(docs, per_doc, strict=True) if d.source == source]
        stats = summary["sources"][source]
        n_tokens = sum(len(ids) for _, ids in mine)
        n_bytes = sum(d.n_bytes for d, _ in mine)
        assert (stats["docs"], stats["tokens"], stats["bytes"]) == (len(mine), n_tokens, n_bytes)
        assert stats["bytes_per_token"] == pytest.approx(n_bytes / (n_tokens - len(mine)))
        assert ds.manifest["sources"][source] == {"docs": len(mine), "tokens": n_tokens, "bytes": n_bytes}
    assert summary["bytes_per_token"] == pytest.approx(ds.total_bytes / (ds.n_tokens - ds.n_docs))

    manifest = json.loads((tmp_path / "train-00000.json").read_text())
    assert manifest["tokenizer_sha256"] == tokenizer_hash(path) == ds.tokenizer_sha256
    assert (manifest["dtype"], manifest["n_tokens"], manifest["n_docs"]) == ("uint16", ds.n_tokens, ds.n_docs)
    assert sorted(manifest["source_names"]) == ["code", "web", "zh"]
    ds.verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "train-00000.bin",
        "train-00000.idx",
        "train-00000.json",
        "train.counts.npy",
        "train.json",
    ]
    assert np.array_equal(ds.counts(), np.bincount(stream, minlength=tokenizer.get_vocab_size()))
    shard_set = json.loads((tmp_path / "train.json").read_text())
    assert shard_set == ds.set_manifest
    assert (shard_set["n_shards"], shard_set["n_tokens"], shard_set["n_docs"]) == (1, ds.n_tokens, ds.n_docs)
    assert shard_set["tokenizer_sha256"] == tokenizer_hash(path) and shard_set["dtype"] == "uint16"
    assert shard_set["shards"] == [
        {"stem": "train-00000", **{k: manifest[k] for k in ("n_tokens", "n_docs", "n_bytes", "bin_xxh64", "idx_xxh64")}}
    ]


def test_dtype_choice(tok, tmp_path):
    assert choose_dtype(65536) == np.uint16
    assert choose_dtype(65537) == np.uint32
    assert choose_dtype(500, "uint32") == np.uint32
    with pytest.raises(ValueError, match="uint16 cannot hold ids of a 70000-token vocabulary"):
        choose_dtype(70000, "uint16")

    tokenizer, path = tok
    docs = make_docs(50)
    small = write_token_shards(docs, tokenizer, path, tmp_path, "a", progress=False)
    wide = write_token_shards(docs, tokenizer, path, tmp_path, "b", dtype="uint32", progress=False)
    assert (small["dtype"], wide["dtype"]) == ("uint16", "uint32")
    assert (tmp_path / "a-00000.bin").stat().st_size == 2 * small["n_tokens"]
    assert (tmp_path / "b-00000.bin").stat().st_size == 4 * wide["n_tokens"]
    a, b = TokenDataset(tmp_path, "a"), TokenDataset(tmp_path, "b")
    assert np.array_equal(a.tokens(0, a.n_tokens), b.tokens(0, b.n_tokens))

    # A vocabulary past 2^16 stores large ids exactly.
    with ShardWriter(tmp_path, "big", "0" * 64, vocab_size=70_000) as writer:
        writer.add([65_535, 65_536, 69_999], "s", 3)
    big = TokenDataset(tmp_path, "big")
    assert big.dtype == np.uint32 and big.tokens(0, 4).tolist() == [65_535, 65_536, 69_999, EOS_ID]
    for bad in (10, 12, -1):
        with pytest.raises(ValueError, match=rf"token id {bad} out of range \[0, 10\)"), \
                ShardWriter(tmp_path, "c", "0" * 64, vocab_size=10) as w:
            w.add([3, bad, 4], "s", 1)


def test_rolling_gives_the_same_virtual_stream(tok, tmp_path):
    tokenizer, path = tok
    docs = make_docs()
    write_token_shards(docs, tokenizer, path, tmp_path / "one", "train", progress=False)
    summary = write_token_shards(
        docs, tokenizer, path, tmp_path / "many", "train", max_shard_tokens=300, progress=False
    )
    one, many = TokenDataset(tmp_path / "one", "train"), TokenDataset(tmp_path / "many", "train")
    assert summary["n_shards"] == len(many.shards) == many.set_manifest["n_shards"] > 5
    assert [e["stem"] for e in many.set_manifest["shards"]] == [f"train-{i:05d}" for i in range(len(many.shards))]
    assert [e["n_tokens"] for e in many.set_manifest["shards"]] == [s.n_tokens for s in many.shards]
    for shard in many.shards:
        longest = int(np.diff(shard.offsets).max())
        assert shard.n_tokens <= 300 or shard.n_docs == 1 and longest > 300
    for attr in ("n_tokens", "n_docs", "total_bytes", "fingerprint"):
        assert getattr(one, attr) == getattr(many, attr)
    for attr in ("doc_starts", "doc_bytes"):
        assert np.array_equal(getattr(one, attr), getattr(many, attr))
    assert [one.source_names[i] for i in one.source_ids] == [many.source_names[i] for i in many.source_ids]
    assert np.array_equal(one.tokens(0, one.n_tokens), many.tokens(0, many.n_tokens))
    rng = np.random.default_rng(0)
    for _ in range(200):
        start, stop = sorted(rng.integers(0, one.n_tokens + 1, size=2))
        assert np.array_equal(one.tokens(start, stop), many.tokens(start, stop))
    positions = rng.integers(0, one.n_tokens, size=(7, 11))
    assert np.array_equal(one.doc_index(positions), many.doc_index(positions))
    many.verify()

    # Rewriting into fewer shards leaves none of the old ones behind.
    write_token_shards(docs[:10], tokenizer, path, tmp_path / "many", "train", progress=False)
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == [
        "train-00000.bin",
        "train-00000.idx",
        "train-00000.json",
        "train.counts.npy",
        "train.json",
    ]


def test_empty_input_gives_an_empty_dataset(tok, tmp_path):
    tokenizer, path = tok
    summary = write_token_shards([], tokenizer, path, tmp_path, "val", progress=False)
    ds = TokenDataset(tmp_path, "val")
    assert (summary["n_tokens"], ds.n_tokens, ds.n_docs, ds.total_bytes) == (0, 0, 0, 0)
    assert ds.tokens(0, 0).size == 0


def test_failed_write_leaves_no_partial_shard(tok, tmp_path):
    tokenizer, path = tok

    def docs_then_crash():
        yield from make_docs(20)
        raise RuntimeError("reader died")

    with pytest.raises(RuntimeError, match="reader died"):
        write_token_shards(docs_then_crash(), tokenizer, path, tmp_path, "train", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def written(tok, tmp_path):
    tokenizer, path = tok
    write_token_shards(make_docs(), tokenizer, path, tmp_path, "train", max_shard_tokens=1000, progress=False)
    return tmp_path


def test_truncated_bin_is_a_clear_error(written):
    bin_path = written / "train-00001.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-2])
    with pytest.raises(ShardError, match=r"train-00001\.bin: .* truncated or corrupted"):
        TokenDataset(written, "train")


def test_corrupted_bin_fails_verify(written):
    bin_path = written / "train-00002.bin"
    data = bytearray(bin_path.read_bytes())
    data[10] ^= 0xFF
    bin_path.write_bytes(bytes(data))
    ds = TokenDataset(written, "train")  # same size: only the checksum can tell
    with pytest.raises(ShardError, match=r"train-00002\.bin: xxh64 .* does not match"):
        ds.verify()


def test_truncated_idx_is_a_clear_error(written):
    idx_path = written / "train-00000.idx"
    idx_path.write_bytes(idx_path.read_bytes()[:-8])
    with pytest.raises(ShardError, match=r"train-00000\.idx: .* truncated or corrupted"):
        TokenDataset(written, "train")


def test_missing_pieces_are_clear_errors(written):
    (written / "train-00001.json").unlink()
    with pytest.raises(ShardError, match=r"train-00001\.json: missing; incomplete shard set, re-run `lmforge tok"):
        TokenDataset(written, "train")
    for suffix in ("bin", "idx"):
        (written / f"train-00001.{suffix}").unlink()
    with pytest.raises(ShardError, match=r"train-00001\.json: missing"):  # listed in train.json, so still needed
        TokenDataset(written, "train")
    with pytest.raises(FileNotFoundError, match=r"no token shard set 'val' .*val\.json not found"):
        TokenDataset(written, "val")


def test_missing_bin_of_a_listed_shard(written):
    (written / "train-00003.bin").unlink()
    with pytest.raises(ShardError, match=r"train-00003\.bin: missing; incomplete shard set"):
        TokenDataset(written, "train")


def test_missing_set_manifest_is_an_incomplete_set(written):
    (written / "train.json").unlink()
    with pytest.raises(ShardError, match=r"incomplete shard set: .*train\.json is missing.*re-run `lmforge tokenize`"):
        TokenDataset(written, "train")


def write_then_crash(out_dir, n_docs: int, tokenizer_sha256: str = "0" * 64) -> None:
    """A ShardWriter that finishes several 10-token shards and then raises."""
    writer = ShardWriter(out_dir, "train", tokenizer_sha256, vocab_size=100, max_shard_tokens=10)
    with pytest.raises(RuntimeError, match="crash"), writer:
        for _ in range(n_docs):
            writer.add([1, 2, 3, 4], "s", 4)
        raise RuntimeError("crash")


def test_writer_that_raises_midway_leaves_an_unreadable_set(tmp_path):
    write_then_crash(tmp_path, n_docs=13)
    assert len(list(tmp_path.glob("train-*.bin"))) == 6, "precondition: finished shards are on disk"
    assert not (tmp_path / "train.json").exists()
    with pytest.raises(ShardError, match="incomplete shard set"):
        TokenDataset(tmp_path, "train")


def test_crash_while_rewriting_never_mixes_old_and_new_shards(tok, written):
    tokenizer, path = tok
    n_old = len(TokenDataset(written, "train").shards)
    write_then_crash(written, n_docs=3, tokenizer_sha256=tokenizer_hash(path))
    assert 0 < len(list(written.glob("train-*.bin"))) < n_old, "precondition: some new shards, no old ones"
    with pytest.raises(ShardError, match="incomplete shard set"):
        TokenDataset(written, "train")
    # A clean rerun makes it readable again.
    write_token_shards(make_docs(30, seed=9), tokenizer, path, written, "train", progress=False)
    assert TokenDataset(written, "train").n_docs == 30


def test_unlisted_shard_is_refused(written):
    extra = written / "train-00099.bin"
    extra.write_bytes(b"")
    with pytest.raises(ShardError, match=r"train-00099\.bin: shard not listed in .*train\.json"):
        TokenDataset(written, "train")


def test_shard_from_another_set_is_refused(tok, written, tmp_path_factory):
    tokenizer, path = tok
    other = tmp_path_factory.mktemp("other")
    write_token_shards(make_docs(seed=4), tokenizer, path, other, "train", max_shard_tokens=1000, progress=False)
    for suffix in ("bin", "idx", "json"):  # a same-named, self-consistent shard of a different run
        (written / f"train-00001.{suffix}").write_bytes((other / f"train-00001.{suffix}").read_bytes())
    with pytest.raises(ShardError, match=r"train-00001\.bin: n_tokens .* differs from .* in .*train\.json"):
        TokenDataset(written, "train")


def test_bad_set_manifest_is_a_clear_error(written):
    set_path = written / "train.json"
    good = json.loads(set_path.read_text())
    set_path.write_text("{not json")
    with pytest.raises(ShardError, match=r"train\.json: set manifest is not valid JSON"):
        TokenDataset(written, "train")
    set_path.write_text(json.dumps({**good, "shards": [{**good["shards"][0], "stem": "../elsewhere"}]}))
    with pytest.raises(ShardError, match=r"train\.json: shard list is not train-00000, train-00001, \.\.\. in order"):
        TokenDataset(written, "train")
    set_path.write_text(json.dumps({**good, "version": 99}))
    with pytest.raises(ShardError, match="not a version 2 lmforge-token-shard-set manifest"):
        TokenDataset(written, "train")


def test_check_tokenizer(written, tok):
    ds = TokenDataset(written, "train")
    ds.check_tokenizer(tokenizer_hash(tok[1]))
    with pytest.raises(ValueError, match=r"train.json: tokenizer_sha256 .* another tokenizer; re-run tokenization"):
        ds.check_tokenizer("f" * 64)


def test_out_of_range_reads(written):
    ds = TokenDataset(written, "train")
    with pytest.raises(IndexError):
        ds.tokens(0, ds.n_tokens + 1)
    with pytest.raises(IndexError):
        ds.doc_index(np.array([ds.n_tokens]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    docs=st.lists(st.tuples(st.lists(st.integers(0, 99), max_size=12), st.sampled_from("ab"), st.integers(0, 50)),
                  max_size=30),
    cuts=st.lists(st.integers(0, 30), max_size=6),
    max_shard_tokens=st.integers(1, 40),
)
def test_packed_documents_write_the_same_files_as_one_at_a_time(tmp_path_factory, docs, cuts, max_shard_tokens):
    """add_packed of any grouping (a source's run of documents cut anywhere, some add()ed between)
    writes byte for byte what add() of each document writes, shard rolls included."""
    root = tmp_path_factory.mktemp("packed")
    with ShardWriter(root / "one", "s", "0" * 64, 100, max_shard_tokens=max_shard_tokens, eos_id=7) as w:
        for ids, source, n_bytes in docs:
            w.add(ids, source, n_bytes)
    with ShardWriter(root / "packed", "s", "0" * 64, 100, max_shard_tokens=max_shard_tokens, eos_id=7) as w:
        group: list[tuple] = []

        def put() -> None:
            if group:
                w.add_packed(pack([g[0] for g in group], [g[2] for g in group], 7, 100, w.dtype), group[0][1])
            group.clear()

        for k, doc in enumerate(docs):
            if (group and doc[1] != group[0][1]) or k in cuts:
                put()
            if k % 7 == 3:  # now and then one document the plain way, between packed ones
                put()
                w.add(doc[0], doc[1], doc[2])
            else:
                group.append(doc)
        put()
    one, packed = sorted((root / "one").iterdir()), sorted((root / "packed").iterdir())
    assert [p.name for p in one] == [p.name for p in packed]
    for a, b in zip(one, packed, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


@settings(max_examples=60, deadline=None)
@given(docs=st.lists(st.lists(st.integers(0, 99).filter(lambda t: t != 7), max_size=12), min_size=1, max_size=20))
def test_pack_joined_equals_pack(docs):
    """Documents an encoder joined with EOS itself pack to what pack() makes of them one by one."""
    tokens = np.array([t for doc in docs for t in (*doc, 7)], dtype=np.uint32)
    n_bytes = [len(doc) * 3 for doc in docs]
    joined = pack_joined(tokens, [len(doc) + 1 for doc in docs], n_bytes, 7, 100, np.dtype("uint16"))
    one_by_one = pack(docs, n_bytes, 7, 100, np.dtype("uint16"))
    assert joined.tokens.dtype == one_by_one.tokens.dtype and np.array_equal(joined.tokens, one_by_one.tokens)
    assert (joined.lengths, joined.n_bytes) == (one_by_one.lengths, one_by_one.n_bytes)
    assert np.array_equal(joined.counts, one_by_one.counts)


def test_pack_joined_refuses_tokens_that_are_not_the_documents():
    tokens = np.array([1, 2, 7, 3, 7], dtype=np.uint32)
    dtype = np.dtype("uint16")
    for lengths, n_bytes in (([2, 2], [1, 1]), ([3, 3], [1, 1]), ([3, 2], [1]), ([0, 5], [1, 1])):
        with pytest.raises(ValueError, match="each ending in EOS 7"):
            pack_joined(tokens, lengths, n_bytes, 7, 100, dtype)
    with pytest.raises(ValueError, match=r"token id 100 out of range \[0, 100\)"):
        pack_joined(np.array([100, 7], dtype=np.uint32), [2], [1], 7, 100, dtype)


def test_pack_refuses_ids_out_of_range():
    for bad in (100, -3):
        with pytest.raises(ValueError, match=rf"token id {bad} out of range \[0, 100\)"):
            pack([[1, 2], np.array([bad, 5])], [2, 2], 0, 100, np.dtype("uint16"))


def test_fingerprint_follows_the_content_not_the_sharding(tmp_path):
    """Loader state is checked against it on resume: a set resharded keeps it, one token changed
    (same totals, same document lengths) changes it."""
    def written(name: str, last: int, max_shard_tokens: int) -> TokenDataset:
        with ShardWriter(tmp_path, name, "0" * 64, 300, max_shard_tokens=max_shard_tokens) as w:
            for k in range(40):
                w.add(np.array([5 + k % 7, 9, last if k == 39 else 11]), source="web", n_bytes=9)
        return TokenDataset(tmp_path, name)

    base, resharded, changed = written("a", 11, 1000), written("b", 11, 16), written("c", 12, 1000)
    assert len(resharded.shards) > 1 == len(base.shards)
    assert (base.n_tokens, base.n_docs) == (changed.n_tokens, changed.n_docs)
    assert base.fingerprint == resharded.fingerprint != changed.fingerprint
