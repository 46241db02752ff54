"""The data stage end to end: accounting, split, outputs, failure behaviour."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.config import BuiltinCorpusConfig, ConfigError, DataConfig, InputConfig
from lmforge.data import pipeline
from lmforge.data.doc_shards import read_documents
from lmforge.data.document import Document
from lmforge.data.ledger import Ledger, LedgerMismatch
from lmforge.data.pipeline import DataStageError, run_data_stage, run_step
from lmforge.data.rounds import split_key

FILTERS = [
    {"name": "strip_html", "sources": ["web"]},
    {"name": "min_words", "min_words": 25},
    {"name": "symbol_ratio", "max_ratio": 0.1, "sources": ["web"]},
    {"name": "stop_words"},
    {"name": "min_upvotes"},
]


def prose(k: int) -> str:
    """A unique, clean ~30-word English paragraph."""
    return f"Paragraph {k} is about the art of cleaning data, and it has words " + " ".join(
        f"token{k}x{j}" for j in range(20)
    )


def write_jsonl(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def rec(**kw) -> str:
    return json.dumps(kw, ensure_ascii=False)


def kept_docs(out: Path) -> tuple[list[Document], list[Document]]:
    return list(read_documents(out / "train")), list(read_documents(out / "val"))


def removed_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "removed.jsonl").read_text(encoding="utf-8").splitlines()]


def assert_ledger_invariants(ledger: dict) -> None:
    counts, steps = ledger["counts"], ledger["steps"]
    sources = {s for by_source in counts.values() for s in by_source}
    zero = {"docs_in": 0, "docs_kept": 0, "docs_removed": 0}
    for i, step in enumerate(steps):
        for source in sources:
            c = counts.get(step, {}).get(source, zero)
            assert c["docs_in"] == c["docs_kept"] + c["docs_removed"], (step, source)
            if i:
                assert c["docs_in"] == counts.get(steps[i - 1], {}).get(source, zero)["docs_kept"], (step, source)


# ---------------------------------------------------------------- end to end


def make_corpus(tmp_path: Path) -> tuple[DataConfig, dict[str, Document]]:
    """A small corpus with a known fate for every record; returns the config and the expected kept docs."""
    lines, expected = [], {}
    for k in range(30):
        lines.append(rec(id=f"good{k}", text=prose(k), source="books"))
        expected[f"good{k}"] = Document(f"good{k}", prose(k), "books")
    lines.append(rec(id="short", text="the tiny doc", source="books"))
    lines.append(rec(id="dup", text="  " + prose(3).replace(" ", "\n"), source="books"))
    lines.append(rec(id="hashy", text=prose(99) + " #" * 5, source="web"))
    lines.append(rec(id="nostop", text=" ".join(f"w{j}" for j in range(40)), source="books"))
    lines.append(rec(id="lowvotes", text=prose(98), source="forum", upvotes=1))
    lines.append(rec(id="votes", text=prose(97), source="forum", upvotes=9))
    expected["votes"] = Document("votes", prose(97), "forum", {"upvotes": 9})
    lines.append(rec(id="html", text=f"<div><p>{prose(96)}</p></div>", source="web"))
    expected["html"] = Document("html", prose(96), "web")
    lines.append("{broken json")
    write_jsonl(tmp_path / "corpus.jsonl", lines)
    # Chinese: 30 characters with stop words survive min_words; 20 do not.
    zh_ok = "我们的数据清洗流程是在预训练之前完成的也有很多步骤和细节需要注意"
    write_jsonl(tmp_path / "zh.jsonl", [rec(id="zh_ok", text=zh_ok), rec(id="zh_short", text=zh_ok[:20])])
    expected["zh_ok"] = Document("zh_ok", zh_ok, "zh")
    cfg = DataConfig(
        inputs=[InputConfig(path=str(tmp_path / "corpus.jsonl")), InputConfig(path=str(tmp_path / "zh.jsonl"))],
        filters=FILTERS, val_fraction=0.2, docs_per_shard=7,
    )
    return cfg, expected


def test_run_data_stage_end_to_end(tmp_path):
    cfg, expected = make_corpus(tmp_path)
    out = tmp_path / "out"
    summary = run_data_stage(cfg, out, seed=3, progress=False)
    train, val = kept_docs(out)
    assert sorted(train + val, key=lambda d: d.id) == sorted(expected.values(), key=lambda d: d.id)
    zh = sum(d.source == "zh" for d in train)  # one task per input file, each with its own shards
    assert len(list((out / "train").glob("shard-*.jsonl.zst"))) == -(-(len(train) - zh) // 7) + -(-zh // 7)

    reasons = {r["id"]: (r["step"], r["reason"]) for r in removed_records(out)}
    assert reasons == {
        "short": ("min_words", "words=3<25"),
        "zh_short": ("min_words", "words=20<25"),
        "dup": ("exact_dedup", "duplicate"),
        "hashy": ("symbol_ratio", "symbol_ratio=0.152>0.1"),  # 5 hashes / 33 words
        "nostop": ("stop_words", "stop_words=0<1"),
        "lowvotes": ("min_upvotes", "upvotes=1<3"),
        "corpus.jsonl:38": ("read", "quarantine"),
    }
    assert all("file" in r["detail"] and "line" in r["detail"] for r in removed_records(out)), "removals point back"
    assert summary["docs_in"] == 40 and summary["docs_kept"] == len(expected) and summary["docs_removed"] == 7
    assert summary["train_docs"] == len(train) and summary["val_docs"] == len(val) and val and train
    assert summary["bytes_kept"] == sum(d.n_bytes for d in expected.values())
    assert summary["per_source"]["forum"] == {
        "docs_in": 2, "docs_kept": 1, "docs_removed": 1,
        "bytes_in": len(prose(98)) + len(prose(97)), "bytes_kept": len(prose(97)), "bytes_removed": len(prose(98)),
        "train_docs": sum(d.source == "forum" for d in train), "val_docs": sum(d.source == "forum" for d in val),
    }
    on_disk = json.loads((out / "ledger.json").read_text())
    assert on_disk == summary["ledger"]
    assert on_disk["steps"] == ["read", "strip_html", "min_words", "symbol_ratio", "stop_words", "min_upvotes",
                                "exact_dedup"]
    assert on_disk["counts"]["strip_html"]["web"]["bytes_kept"] < on_disk["counts"]["strip_html"]["web"]["bytes_in"]
    assert_ledger_invariants(on_disk)
    assert "min_words" in summary["table"] and "forum" in summary["table"]


def test_split_is_deterministic_per_seed_and_disjoint(tmp_path):
    lines = [rec(id=f"d{k}", text=prose(k)) for k in range(200)]
    write_jsonl(tmp_path / "c.jsonl", lines)

    def split(seed: int, name: str) -> tuple[list[str], list[str]]:
        cfg = DataConfig(inputs=[InputConfig(path=str(tmp_path / "c.jsonl"))], val_fraction=0.2, split_seed=seed)
        run_data_stage(cfg, tmp_path / name, progress=False)
        train, val = kept_docs(tmp_path / name)
        return [d.id for d in train], [d.id for d in val]

    train1, val1 = split(1, "a")
    assert split(1, "b") == (train1, val1)
    assert not set(train1) & set(val1) and len(train1) + len(val1) == 200
    assert set(val1) == {f"d{k}" for k in range(200) if split_key(f"d{k}", 1) < 0.2}
    assert 20 <= len(val1) <= 60
    _, val2 = split(2, "c")
    assert set(val2) != set(val1)


def test_split_guarantees_a_val_and_a_train_doc(tmp_path):
    ids = [f"tiny{k}" for k in range(3)]
    assert all(split_key(i, 0) >= 0.01 for i in ids), "precondition: hashing alone puts nothing in val"
    write_jsonl(tmp_path / "c.jsonl", [rec(id=i, text=prose(k)) for k, i in enumerate(ids)])
    cfg = DataConfig(inputs=[InputConfig(path=str(tmp_path / "c.jsonl"))], val_fraction=0.01, split_seed=0)
    summary = run_data_stage(cfg, tmp_path / "out", seed=0, progress=False)
    train, val = kept_docs(tmp_path / "out")
    assert (summary["train_docs"], summary["val_docs"]) == (2, 1)
    assert [d.id for d in val] == [min(ids, key=lambda i: split_key(i, 0))], "the most val-like doc moves"
    assert sorted(d.id for d in train + val) == ids


def test_too_few_documents_raise_and_keep_previous_outputs(tmp_path):
    write_jsonl(tmp_path / "good.jsonl", [rec(id=f"g{k}", text=prose(k)) for k in range(10)])
    out = tmp_path / "out"
    run_data_stage(DataConfig(inputs=[InputConfig(path=str(tmp_path / "good.jsonl"))]), out, 0, progress=False)
    before = kept_docs(out)
    write_jsonl(tmp_path / "one.jsonl", [rec(id="only", text=prose(1)), rec(id="short", text="the end")])
    with pytest.raises(DataStageError, match="only one document"):
        run_data_stage(DataConfig(inputs=[InputConfig(path=str(tmp_path / "one.jsonl"))]), out, 0, progress=False)
    assert kept_docs(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["ledger.json", "removed.jsonl", "report.md", "train", "val"]
    with pytest.raises(DataStageError, match="no documents survived"):
        run_data_stage(DataConfig(inputs=[InputConfig(path=str(tmp_path / "one.jsonl"))], filters=[
            {"name": "min_words", "min_words": 1000}]), tmp_path / "out2", 0, progress=False)
    assert not (tmp_path / "out2" / "train").exists()


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _fail_ledger_check(self: Ledger) -> None:
    raise LedgerMismatch("simulated crash after the shards were written")


def _fail_json_write(path: Path, obj: object) -> None:
    raise OSError("simulated crash writing ledger.json")


@pytest.mark.parametrize("crash", [_fail_ledger_check, _fail_json_write], ids=["ledger_check", "ledger_json"])
def test_crash_late_in_the_stage_keeps_all_previous_outputs(tmp_path, monkeypatch, crash):
    write_jsonl(tmp_path / "old.jsonl", [rec(id=f"old{k}", text=prose(k)) for k in range(12)] + ["{bad"])
    out = tmp_path / "out"
    run_data_stage(DataConfig(inputs=[InputConfig(path=str(tmp_path / "old.jsonl"))], docs_per_shard=3), out, 0,
                   progress=False)
    before = snapshot(out)
    assert {"ledger.json", "removed.jsonl", "train/shard-000000-00000.jsonl.zst"} <= set(before)

    # A different corpus and seed: any new file that slipped through would differ from the old one.
    write_jsonl(tmp_path / "new.jsonl", [rec(id=f"new{k}", text=prose(k)) for k in range(20)] + ["{worse"])
    if crash is _fail_ledger_check:
        monkeypatch.setattr(Ledger, "check", crash)
    else:
        monkeypatch.setattr(pipeline, "atomic_write_json", crash)
    with pytest.raises((LedgerMismatch, OSError), match="simulated crash"):
        run_data_stage(DataConfig(inputs=[InputConfig(path=str(tmp_path / "new.jsonl"))], docs_per_shard=3), out, 1,
                       progress=False)
    assert snapshot(out) == before
    # Only the failed run's resumable work directory is left beside the untouched output.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.work", "new.jsonl", "old.jsonl", "out"]


def test_rerun_replaces_shards_without_stale_ones(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [rec(id=f"d{k}", text=prose(k)) for k in range(40)])
    spec = InputConfig(path=str(tmp_path / "c.jsonl"))
    out = tmp_path / "out"
    run_data_stage(DataConfig(inputs=[spec], docs_per_shard=2, val_fraction=0.1), out, 0, progress=False)
    assert len(list((out / "train").iterdir())) > 10
    write_jsonl(tmp_path / "c.jsonl", [rec(id=f"d{k}", text=prose(k)) for k in range(5)])
    run_data_stage(DataConfig(inputs=[spec], docs_per_shard=100, val_fraction=0.1), out, 0, progress=False)
    train, val = kept_docs(out)
    assert sorted(d.id for d in train + val) == [f"d{k}" for k in range(5)]
    assert [p.name for p in (out / "train").iterdir()] == ["shard-000000-00000.jsonl.zst"]


def test_bad_recipe_fails_before_reading(tmp_path):
    missing = InputConfig(path=str(tmp_path / "missing.jsonl"))
    bad = DataConfig(inputs=[missing], filters=[{"name": "min_words"}, {"name": "min_words", "min_wrds": 1}])
    with pytest.raises(ConfigError, match=r"^data\.filters\[1\]\.min_wrds"):
        run_data_stage(bad, tmp_path / "out", 0, progress=False)
    with pytest.raises(ConfigError, match=r"^data\.inputs\[0\]\.path"):
        run_data_stage(DataConfig(inputs=[missing]), tmp_path / "out", 0, progress=False)
    assert not (tmp_path / "out").exists()


def test_repeated_filter_names_get_distinct_ledger_rows(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [rec(id=f"d{k}", text=prose(k)) for k in range(10)])
    cfg = DataConfig(inputs=[InputConfig(path=str(tmp_path / "c.jsonl"))],
                     filters=[{"name": "min_words", "min_words": 5}, {"name": "min_words", "min_words": 10}])
    summary = run_data_stage(cfg, tmp_path / "out", 0, progress=False)
    assert summary["ledger"]["steps"] == ["read", "min_words", "min_words#2", "exact_dedup"]


def test_repeated_ids_are_removed_within_a_file_and_kept_across_inputs(tmp_path):
    books, web = tmp_path / "c.jsonl", tmp_path / "w.jsonl"
    write_jsonl(books, [rec(id=i, text=prose(k)) for k, i in enumerate(["a", "b", "a", "c"], 1)])
    # Per-dataset ids are normal: web's "b" is another document than books' "b", and both stay.
    write_jsonl(web, [rec(id="b", text=prose(5)), rec(id="d", text=prose(6))])
    cfg = DataConfig(inputs=[InputConfig(path=str(books), source="books"), InputConfig(path=str(web))])
    summary = run_data_stage(cfg, tmp_path / "out", 0, progress=False)
    train, val = kept_docs(tmp_path / "out")
    assert sorted((d.id, d.text) for d in train + val) == [("a", prose(1)), ("b", prose(2)), ("b", prose(5)),
                                                          ("c", prose(4)), ("d", prose(6))]
    assert removed_records(tmp_path / "out") == [
        {"id": "a", "source": "books", "step": "read", "reason": "duplicate_id",
         "detail": {"file": str(books), "line": 3, "first_line": 1}},
    ]
    assert (summary["docs_in"], summary["docs_kept"], summary["docs_removed"]) == (6, 5, 1)
    assert_ledger_invariants(summary["ledger"])


def test_same_named_files_in_one_directory_are_distinct_documents(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / "in" / folder).mkdir(parents=True)
        write_jsonl(tmp_path / "in" / folder / "x.jsonl", [rec(text=prose(k) + folder) for k in range(3)])
    summary = run_data_stage(DataConfig(inputs=[InputConfig(path=str(tmp_path / "in"))]), tmp_path / "out", 0,
                             progress=False)
    train, val = kept_docs(tmp_path / "out")
    assert sorted(d.id for d in train + val) == [f"{f}/x.jsonl:{k}" for f in ("a", "b") for k in (1, 2, 3)]
    assert summary["docs_removed"] == 0


def test_labelled_inputs_with_the_same_file_name_do_not_collide(tmp_path):
    inputs = []
    for source in ("web", "books"):
        (tmp_path / source).mkdir()
        write_jsonl(tmp_path / source / "data.jsonl", [rec(text=prose(k) + source) for k in range(2)])
        inputs.append(InputConfig(path=str(tmp_path / source / "data.jsonl"), source=source))
    summary = run_data_stage(DataConfig(inputs=inputs), tmp_path / "out", 0, progress=False)
    train, val = kept_docs(tmp_path / "out")
    assert sorted(d.id for d in train + val) == sorted(f"{s}/data.jsonl:{k}" for s in ("web", "books") for k in (1, 2))
    assert summary["docs_removed"] == 0


def test_builtin_corpus_is_the_default_input(tmp_path):
    cfg = DataConfig(builtin=BuiltinCorpusConfig(max_prose_bytes=40_000, max_code_bytes=40_000))
    summary = run_data_stage(cfg, tmp_path / "out", 0, progress=False)
    assert set(summary["per_source"]) == {"prose", "code"}
    assert all(row["docs_kept"] > 0 for row in summary["per_source"].values())
    assert summary["docs_kept"] == summary["train_docs"] + summary["val_docs"]


def test_ledger_check_catches_a_step_that_loses_documents():
    class Lossy:
        name = "lossy"

        def __call__(self, docs, ledger):
            for i, d in enumerate(docs):
                if i % 2 == 0:
                    yield d

    ledger = Ledger(steps=["lossy"])
    docs = [Document(str(i), "x", "s") for i in range(4)]
    assert len(list(run_step(Lossy(), docs, ledger))) == 2
    with pytest.raises(LedgerMismatch, match="in=4 != kept=2 \\+ removed=0"):
        ledger.check()


def test_ledger_check_catches_a_gap_between_steps():
    ledger = Ledger(steps=["a", "b"])
    ledger.count_in("a", "s", 1)
    ledger.count_kept("a", "s", 1)
    with pytest.raises(LedgerMismatch, match="step 'b' received 0 docs but step 'a' kept 1"):
        ledger.check()


# ---------------------------------------------------------------- every document is accounted for

TEXTS = [
    prose(1), prose(2), "the short one", "<p>" + prose(3) + "</p>", prose(4) + " ###### ......",
    "数据" * 20 + "的", "数据" * 5, " ".join(f"w{j}" for j in range(30)), prose(1) + "  ",
]
record = st.one_of(
    st.fixed_dictionaries(
        {"text": st.sampled_from(TEXTS), "source": st.sampled_from(["web", "books"])},
        optional={"upvotes": st.integers(0, 6), "id_kind": st.sampled_from(["own", "none", "shared"])},
    ),
    st.sampled_from(["{bad", '{"text": null}', "[1, 2]"]),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=st.lists(record, max_size=25))
def test_every_input_document_is_accounted_for(records):
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        lines, input_ids = [], []
        for k, r in enumerate(records):
            line_no = k + 1
            if isinstance(r, str):
                lines.append(r)
                input_ids.append(f"c.jsonl:{line_no}")
                continue
            r = dict(r)
            id_kind = r.pop("id_kind", "own")
            if id_kind != "none":
                r["id"] = f"r{k}" if id_kind == "own" else f"shared{k % 2}"
            lines.append(json.dumps(r))
            input_ids.append(r.get("id", f"c.jsonl:{line_no}"))
        # Two documents that always survive, so the split has something to work with.
        for k in range(2):
            lines.append(json.dumps({"id": f"sure{k}", "text": prose(50 + k), "source": "books"}))
            input_ids.append(f"sure{k}")
        write_jsonl(tmp_path / "c.jsonl", lines)
        cfg = DataConfig(inputs=[InputConfig(path=str(tmp_path / "c.jsonl"))], filters=FILTERS, val_fraction=0.3)
        summary = run_data_stage(cfg, tmp_path / "out", seed=5, progress=False)

        train, val = kept_docs(tmp_path / "out")
        kept_ids = [d.id for d in train + val]
        removed = removed_records(tmp_path / "out")
        assert sorted(kept_ids + [r["id"] for r in removed]) == sorted(input_ids)
        assert len(set(kept_ids)) == len(kept_ids)
        assert not set(kept_ids) & {r["id"] for r in removed if r["reason"] != "duplicate_id"}
        for r in removed:
            if r["reason"] == "duplicate_id":  # a later occurrence of an id already read
                assert input_ids.index(r["id"]) < r["detail"]["line"] - 1
        assert summary["docs_in"] == len(input_ids)
        assert summary["docs_kept"] == len(kept_ids) and summary["docs_removed"] == len(removed)
        assert_ledger_invariants(summary["ledger"])
        for step in summary["ledger"]["steps"]:
            in_file = sum(r["step"] == step for r in removed)
            assert in_file == sum(c["docs_removed"] for c in summary["ledger"]["counts"][step].values())


def test_small_files_of_an_input_are_grouped_into_few_tasks(tmp_path):
    """40 files of one folder: grouped by data.task_bytes in file order, the stage keeps exactly the
    documents it keeps with one task per file; ids repeat freely across files of one task, but a
    repeat inside a file is still removed."""
    from lmforge.data.rounds import plan_tasks

    folder = tmp_path / "in"
    folder.mkdir()
    for f in range(40):
        lines = [rec(id=str(k), text=prose(100 * f + k)) for k in range(3)]
        write_jsonl(folder / f"part{f:02d}.jsonl", lines + ([lines[0]] if f == 7 else []))
    size = (folder / "part00.jsonl").stat().st_size
    grouped = DataConfig(inputs=[InputConfig(path=str(folder))], task_bytes=10 * size, dedup=[])
    tasks = plan_tasks(grouped)
    sizes = [[Path(p).stat().st_size for p in t.paths] for t in tasks]
    assert 4 <= len(tasks) <= 5 and all(sum(s) >= 10 * size > sum(s[:-1]) for s in sizes[:-1])
    assert [p for t in tasks for p in t.paths] == [str(folder / f"part{f:02d}.jsonl") for f in range(40)]
    per_file = DataConfig(inputs=[InputConfig(path=str(folder))], task_bytes=1, dedup=[])
    assert len(plan_tasks(per_file)) == 40

    a = run_data_stage(grouped, tmp_path / "grouped", 0, progress=False)
    b = run_data_stage(per_file, tmp_path / "per_file", 0, progress=False)
    docs = [[(d.id, d.text) for d in split] for split in kept_docs(tmp_path / "grouped")]
    assert docs == [[(d.id, d.text) for d in split] for split in kept_docs(tmp_path / "per_file")]
    assert sum(len(split) for split in docs) == 120  # the same ids in 40 files: all kept
    assert a["docs_removed"] == b["docs_removed"] == 1  # part07's repeated record
    assert [r["reason"] for r in removed_records(tmp_path / "grouped")] == ["duplicate_id"]


def test_removal_chart_keeps_the_sources_that_lost_most_and_sums_the_rest():
    from lmforge.data.report import CHART_SOURCES, _top_sources

    removed = {f"part{k:02d}": [k, 2 * k] for k in range(40)}  # one source per file of a folder
    top = _top_sources(removed)
    assert len(top) == CHART_SOURCES
    assert list(top)[:3] == ["part39", "part38", "part37"] and list(top)[-1] == f"{41 - CHART_SOURCES} other sources"
    totals = [sum(col) for col in zip(*removed.values(), strict=True)]
    assert [sum(col) for col in zip(*top.values(), strict=True)] == totals, "every removal is still counted"
    few = {"prose": [1, 0], "code": [0, 2]}
    assert _top_sources(few) == few
