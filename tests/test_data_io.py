"""Readers (jsonl/.gz/.zst, parquet, text, directories, globs), quarantine, shards, builtin corpus."""

from __future__ import annotations

import gzip
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lmforge.config import BuiltinCorpusConfig, InputConfig
from lmforge.data.builtin import docstrings, iter_builtin_corpus
from lmforge.data.doc_shards import ShardReadError, ShardWriter, read_documents
from lmforge.data.document import Document
from lmforge.data.inputs import PARQUET_BATCH_ROWS, iter_input
from lmforge.data.ledger import Ledger


def jsonl_bytes(records: list) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


RECORDS = [
    {"id": "a", "text": "alpha text", "lang": "en"},
    {"text": "no id here"},
    {"id": 7, "text": "数字 id", "source": "books"},
]


def read(spec: InputConfig, tmp_path: Path) -> tuple[list[Document], list[dict], Ledger]:
    removed_path = tmp_path / "removed.jsonl"
    with Ledger(removed_path) as ledger:
        docs = list(iter_input(spec, ledger))
    removed = [json.loads(line) for line in removed_path.read_text().splitlines()]
    ledger.check()
    return docs, removed, ledger


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_plain_gz_zst(tmp_path, suffix):
    data = jsonl_bytes(RECORDS)
    if suffix.endswith(".gz"):
        data = gzip.compress(data)
    elif suffix.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path = tmp_path / f"corpus{suffix}"
    path.write_bytes(data)
    docs, removed, ledger = read(InputConfig(path=str(path)), tmp_path)
    assert removed == []
    assert [(d.id, d.text, d.source) for d in docs] == [
        ("a", "alpha text", "corpus"),  # no label anywhere -> the file stem, compression suffix dropped
        (f"corpus{suffix}:2", "no id here", "corpus"),  # default id: path relative to the file's folder, line
        ("7", "数字 id", "books"),  # the record's own source field
    ]
    assert docs[0].meta == {"lang": "en"}
    assert ledger.counts("read", "corpus").docs_kept == 2


def test_multi_frame_zst_is_read_to_the_end(tmp_path):
    frames = [zstandard.ZstdCompressor().compress(jsonl_bytes([{"text": f"frame {k}"}])) for k in range(3)]
    (tmp_path / "cat.jsonl.zst").write_bytes(b"".join(frames))  # what `cat a.zst b.zst c.zst` makes
    docs, removed, _ = read(InputConfig(path=str(tmp_path / "cat.jsonl.zst")), tmp_path)
    assert [d.text for d in docs] == ["frame 0", "frame 1", "frame 2"] and removed == []


def test_source_label_and_keys_from_the_spec(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(jsonl_bytes([{"uid": "u1", "body": "hello", "source": "forum", "upvotes": 5}]))
    docs, _, _ = read(InputConfig(path=str(path), source="web", text_key="body", id_key="uid"), tmp_path)
    assert [(d.id, d.text, d.source) for d in docs] == [("u1", "hello", "web")]
    assert docs[0].meta == {"source": "forum", "upvotes": 5}, "an overridden record source stays in meta"


def test_bad_jsonl_lines_are_quarantined_with_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"id": "ok1", "text": "fine"}\n'
        b"{not json\n"
        b"\n"  # blank lines are not records
        b'{"id": "t", "text": 5}\n'
        b'["a", "list"]\n'
        b'{"id": "bin", "text": "\xff\xfe"}\n'
        b'{"id": "ok2", "text": "also fine"}\n'
    )
    docs, removed, ledger = read(InputConfig(path=str(path)), tmp_path)
    assert [d.id for d in docs] == ["ok1", "ok2"]
    assert [(r["id"], r["step"], r["reason"], r["detail"]["file"], r["detail"]["line"]) for r in removed] == [
        ("bad.jsonl:2", "read", "quarantine", str(path), 2),
        ("t", "read", "quarantine", str(path), 4),
        ("bad.jsonl:5", "read", "quarantine", str(path), 5),
        ("bad.jsonl:6", "read", "quarantine", str(path), 6),  # not UTF-8: unparsed, so the default id
    ]
    assert "invalid JSON" in removed[0]["detail"]["problem"]
    assert "'text'" in removed[1]["detail"]["problem"]
    assert "not an object" in removed[2]["detail"]["problem"]
    c = ledger.counts("read", "bad")
    assert (c.docs_in, c.docs_kept, c.docs_removed) == (6, 2, 4)


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_truncated_compressed_file_is_quarantined_not_raised(tmp_path, suffix):
    raw = jsonl_bytes([{"id": str(i), "text": f"{i} " * 40} for i in range(5000)])
    data = gzip.compress(raw) if suffix == ".gz" else zstandard.ZstdCompressor().compress(raw)
    path = tmp_path / f"cut.jsonl{suffix}"
    path.write_bytes(data[: len(data) // 2])
    docs, removed, ledger = read(InputConfig(path=str(path)), tmp_path)
    assert 0 < len(docs) < 5000
    assert len(removed) == 1 and removed[0]["reason"] == "quarantine"
    assert removed[0]["detail"]["line"] == len(docs) + 1
    assert "unreadable" in removed[0]["detail"]["problem"]


def test_parquet_batched_with_null_text_quarantined(tmp_path):
    n = PARQUET_BATCH_ROWS + 5  # crosses a batch boundary
    texts = [f"row {i}" for i in range(n)]
    texts[3] = None
    table = pa.table({"id": [f"r{i}" for i in range(n)], "text": texts, "score": list(range(n))})
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=300)
    docs, removed, _ = read(InputConfig(path=str(path), source="pq"), tmp_path)
    assert len(docs) == n - 1
    assert docs[-1].id == f"r{n - 1}" and docs[-1].text == f"row {n - 1}" and docs[-1].meta == {"score": n - 1}
    assert [(r["id"], r["detail"]["line"]) for r in removed] == [("r3", 4)]


def test_parquet_without_text_column_and_non_parquet_file(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"not parquet at all")
    out = tmp_path / "out"
    out.mkdir()
    docs, removed, _ = read(InputConfig(path=str(tmp_path / "*.parquet")), out)
    assert docs == []
    assert [r["detail"]["file"] for r in removed] == [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]
    assert "no column 'text'" in removed[0]["detail"]["problem"]


def test_directory_recursive_sorted_mixed_formats(tmp_path):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("bee text")
    (root / "a.md").write_text("\ufeff# Title\nbody")
    (root / "sub" / "c.jsonl").write_text('{"id": "c1", "text": "sea"}\n')
    (root / ".hidden.txt").write_text("skip me")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    out = tmp_path / "out"
    out.mkdir()
    docs, removed, _ = read(InputConfig(path=str(root)), out)
    assert [(d.id, d.text, d.source) for d in docs] == [
        ("a.md", "# Title\nbody", "a"),
        ("b.txt", "bee text", "b"),
        ("c1", "sea", "c"),
    ]
    assert [(r["id"], r["reason"]) for r in removed] == [("latin1.txt", "quarantine")]
    assert "UTF-8" in removed[0]["detail"]["problem"]


def test_glob_and_explicit_format(tmp_path):
    (tmp_path / "one.data").write_text('{"text": "j1"}\n')
    (tmp_path / "two.data").write_text('{"text": "j2"}\n')
    out = tmp_path / "out"
    out.mkdir()
    docs, _, _ = read(InputConfig(path=str(tmp_path / "*.data"), format="jsonl"), out)
    assert [(d.id, d.text) for d in docs] == [("one.data:1", "j1"), ("two.data:1", "j2")]
    docs, _, _ = read(InputConfig(path=str(tmp_path / "*.data")), out)
    assert [d.text for d in docs] == ['{"text": "j1"}\n', '{"text": "j2"}\n'], "auto: unknown suffix is text"


def test_default_ids_are_relative_paths_so_same_named_files_differ(tmp_path):
    root = tmp_path / "in"
    for folder in ("a", "b"):
        (root / folder).mkdir(parents=True)
        (root / folder / "x.jsonl").write_text('{"text": "first"}\n{"text": "second"}\n')
        (root / folder / "n.txt").write_text(f"text in {folder}")
        pq.write_table(pa.table({"text": ["row"]}), root / folder / "t.parquet")
    out = tmp_path / "out"
    out.mkdir()
    expected = [
        "a/n.txt", "a/t.parquet:1", "a/x.jsonl:1", "a/x.jsonl:2",
        "b/n.txt", "b/t.parquet:1", "b/x.jsonl:1", "b/x.jsonl:2",
    ]  # fmt: skip
    docs, _, _ = read(InputConfig(path=str(root)), out)
    assert [d.id for d in docs] == expected
    # A glob's ids are relative to its leading folders without wildcards, so they match the directory's.
    docs, _, _ = read(InputConfig(path=str(root / "*" / "*")), out)
    assert [d.id for d in docs] == expected
    docs, _, _ = read(InputConfig(path=str(root / "**" / "x.jsonl")), out)
    assert [d.id for d in docs] == ["a/x.jsonl:1", "a/x.jsonl:2", "b/x.jsonl:1", "b/x.jsonl:2"]
    # A single file's ids are relative to its own folder.
    docs, _, _ = read(InputConfig(path=str(root / "b" / "x.jsonl")), out)
    assert [d.id for d in docs] == ["x.jsonl:1", "x.jsonl:2"]


def test_missing_input_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no files"):
        list(iter_input(InputConfig(path=str(tmp_path / "nope*.jsonl")), Ledger()))


# ---------------------------------------------------------------- shards


def test_shard_writer_round_trip_and_atomicity(tmp_path):
    docs = [Document(id=f"d{i}", text=f"text {i} é中", source="s", meta={"i": i}) for i in range(7)]
    with ShardWriter(tmp_path / "shards", docs_per_shard=3) as w:
        for d in docs:
            w.write(d)
    names = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert names == ["shard-00000.jsonl.zst", "shard-00001.jsonl.zst", "shard-00002.jsonl.zst"]
    assert w.n_docs == 7
    assert list(read_documents(tmp_path / "shards")) == docs
    assert list(read_documents(str(tmp_path / "shards" / "shard-0000[12].jsonl.zst"))) == docs[3:]
    with pytest.raises(FileExistsError):
        ShardWriter(tmp_path / "shards", 3)


def test_shard_writer_failure_leaves_only_complete_shards(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, docs_per_shard=2) as w:
        for i in range(3):
            w.write(Document(id=str(i), text="t", source="s"))
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.jsonl.zst"]


def write_shards(out: Path, n_docs: int, docs_per_shard: int) -> list[Document]:
    docs = [Document(id=f"d{i}", text=f"{i} " * 40, source="s") for i in range(n_docs)]
    with ShardWriter(out, docs_per_shard) as w:
        for d in docs:
            w.write(d)
    return docs


def test_truncated_shard_raises_naming_the_file(tmp_path):
    write_shards(tmp_path, 5000, docs_per_shard=4000)
    cut = tmp_path / "shard-00000.jsonl.zst"
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardReadError, match=rf"^{re.escape(str(cut))}: truncated after line \d+") as info:
        list(read_documents(tmp_path))
    assert isinstance(info.value, ValueError)
    cut.write_bytes(b"")
    with pytest.raises(ShardReadError, match=rf"^{re.escape(str(cut))}: truncated"):
        list(read_documents(tmp_path))


@pytest.mark.parametrize("meta", [True, False])
def test_bad_shard_line_raises_naming_file_and_line(tmp_path, meta):
    docs = write_shards(tmp_path, 3, docs_per_shard=2)
    second = tmp_path / "shard-00001.jsonl.zst"
    good = docs[2].to_json()
    for lines, problem in [
        ([json.dumps(good), "{not json"], "invalid JSON"),
        ([json.dumps(good), json.dumps(["a", "list"])], "JSON list, not an object"),
        ([json.dumps(good), json.dumps("a string")], "JSON str, not an object"),
        ([json.dumps(good), json.dumps({"id": "x", "text": "no source"})], "lacks 'source'"),
        ([json.dumps(good), json.dumps({"source": "s"})], "lacks 'id', 'text'"),
    ]:
        second.write_bytes(zstandard.ZstdCompressor().compress("".join(f"{x}\n" for x in lines).encode()))
        with pytest.raises(ShardReadError, match=rf"^{re.escape(str(second))}:2: .*{problem}"):
            list(read_documents(tmp_path, meta=meta))


# ---------------------------------------------------------------- builtin corpus

SMALL = BuiltinCorpusConfig(max_prose_bytes=60_000, max_code_bytes=80_000, min_docstring_chars=200)


def test_builtin_corpus_both_sources_caps_ids_and_determinism():
    docs = list(iter_builtin_corpus(SMALL))
    by_source = Counter(d.source for d in docs)
    size = Counter()
    for d in docs:
        size[d.source] += d.n_bytes
    assert set(by_source) == {"prose", "code"}
    assert size["prose"] <= SMALL.max_prose_bytes and size["code"] <= SMALL.max_code_bytes
    assert size["prose"] > SMALL.max_prose_bytes * 0.9, "the cap is filled, not just respected"
    ids = [d.id for d in docs]
    assert len(set(ids)) == len(ids)
    assert all(i.startswith(("prose/", "code/")) and ".py" in i for i in ids)
    for d in docs:
        if d.source == "prose" and not d.id.startswith("prose/pydoc_data/topics.py:"):
            assert len(d.text) >= SMALL.min_docstring_chars
    assert not any("/tests/" in i or "/test/" in i or "site-packages" in i for i in ids)
    # Spread over the library, not the first packages alphabetically.
    assert len({i.split("/")[1][:1] for i in ids if i.startswith("code/")}) >= 3
    assert [d.id for d in iter_builtin_corpus(SMALL)] == ids


def test_builtin_code_docs_are_the_source_files():
    import sysconfig

    docs = [d for d in iter_builtin_corpus(SMALL) if d.source == "code"]
    root = Path(sysconfig.get_paths()["stdlib"])
    assert docs
    for d in docs[:3]:
        assert d.text == (root / d.id.removeprefix("code/")).read_text(encoding="utf-8")


def test_docstrings_qualified_names_cleaned_and_nested_in_blocks():
    src = '''"""Module doc."""
class A:
    """Class doc.

    Body.
        indented line
    """
    def f(self):
        """Method doc."""
if True:
    def g():
        """Conditional def."""
        def inner():
            """Inner."""
'''
    assert list(docstrings(src)) == [
        ("", "Module doc."),
        ("A", "Class doc.\n\nBody.\n    indented line"),
        ("A.f", "Method doc."),
        ("g", "Conditional def."),
        ("g.inner", "Inner."),
    ]
    with pytest.raises(SyntaxError):
        list(docstrings("def broken(:\n"))


def test_text_only_reading_matches_and_survives_what_orjson_refuses(tmp_path):
    """read_documents(meta=False) (the tokenize stage's fast path, orjson) gives the same ids, texts
    and sources; meta holding NaN (which json writes) or a 100-bit integer falls back to json, and
    the full read keeps such meta exactly."""
    docs = [Document(f"d{i}", f"text {i} 模型", "web", {"score": s, "big": 2**100 + i})
            for i, s in enumerate([0.5, float("nan"), float("inf")])]
    with ShardWriter(tmp_path / "shards", docs_per_shard=2) as w:
        for d in docs:
            w.write(d)
    fast = list(read_documents(tmp_path / "shards", meta=False))
    assert [(d.id, d.text, d.source, d.meta) for d in fast] == [(d.id, d.text, d.source, {}) for d in docs]
    full = list(read_documents(tmp_path / "shards"))
    assert [d.meta["big"] for d in full] == [2**100 + i for i in range(3)]
    assert full[0].meta["score"] == 0.5 and full[1].meta["score"] != full[1].meta["score"]  # NaN


def test_atomic_file_streams_in_pieces_and_starts_writeback(tmp_path, monkeypatch):
    from lmforge import io_utils

    calls = []
    if hasattr(os, "posix_fadvise"):
        real = os.posix_fadvise
        monkeypatch.setattr(os, "posix_fadvise", lambda *a: (calls.append(a[1:]), real(*a)))
    monkeypatch.setattr(io_utils, "WRITEBACK_BYTES", 1000)
    pieces = [b"x" * 700, np.arange(300, dtype=np.uint16), b"y" * 5000, b""]
    out = io_utils.AtomicFile(tmp_path / "f.bin")
    for piece in pieces:
        out.write(piece)
    assert not (tmp_path / "f.bin").exists(), "nothing at the final name before commit"
    out.commit()
    assert (tmp_path / "f.bin").read_bytes() == b"".join(bytes(memoryview(p)) for p in pieces)
    started = [(0, 1300, os.POSIX_FADV_DONTNEED), (1300, 5000, os.POSIX_FADV_DONTNEED)]
    assert calls == (started if hasattr(os, "posix_fadvise") else []), "each stretch once, never the whole file"
    aborted = io_utils.AtomicFile(tmp_path / "g.bin")
    aborted.write(b"z" * 3000)
    aborted.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"], "an aborted file leaves nothing behind"
