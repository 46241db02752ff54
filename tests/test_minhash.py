"""MinHash near-dedup: planted near-duplicates found (English, Chinese), same kept set however the
corpus is split or the tasks are ordered, removal details, alarms, and the LSH plan's arithmetic."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.data.dedup import DEDUP
from lmforge.data.dedup.base import doc_key, key_task
from lmforge.data.dedup.lsh_plan import (
    candidate_probability,
    cluster_probability,
    error_rates,
    format_plan,
    memory_estimate,
    midpoint,
)
from lmforge.data.dedup.minhash import DedupAlarm, MinHashDedup, components
from lmforge.data.dedup.signatures import MinHasher, batch_token_hashes, similarity, token_hashes
from lmforge.data.document import Document

CJK_BASE = 0x4E00


def run_dedup(step: MinHashDedup, tasks: list[list[Document]], tmp: Path, order: list[int] | None = None) -> dict:
    """Map every task into its own dir (in `order`), reduce, then load+apply per task; removed id -> detail."""
    order = order if order is not None else list(range(len(tasks)))
    dirs = {t: tmp / f"map{t}" for t in order}
    for t in order:
        step.map(((doc_key(t, i), d) for i, d in enumerate(tasks[t])), dirs[t])
    out = tmp / "decisions"
    out.mkdir()
    summary = step.reduce([dirs[t] for t in order], out)
    removed = {}
    for t, docs in enumerate(tasks):
        decisions = step.load(out, t)
        for i, d in enumerate(docs):
            kept, reason, detail = step.apply(decisions, doc_key(t, i), d)
            if kept is None:
                assert reason == "near_duplicate"
                removed[d.id] = detail
            else:
                assert kept is d and detail == {}
    removed["__summary__"] = summary
    return removed


def english_doc(rng: random.Random, vocab: list[str], n: int = 300) -> list[str]:
    return [rng.choice(vocab) for _ in range(n)]


def chinese_doc(rng: random.Random, n: int = 400) -> list[str]:
    chars = [chr(CJK_BASE + rng.randrange(3000)) for _ in range(n)]
    for i in range(15, n, 17):  # punctuation, which normalisation drops
        chars[i] = rng.choice("，。、")
    return chars


def planted(lang: str, seed: int = 0) -> tuple[list[Document], dict[str, str]]:
    """Unique documents plus families of edited copies; returns docs and id -> family base id."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(4000)]
    sep = " " if lang == "en" else ""
    docs, family = [], {}
    for i in range(240):
        toks = english_doc(rng, vocab) if lang == "en" else chinese_doc(rng)
        base_id = f"{lang}{i}"
        docs.append(Document(base_id, sep.join(toks), "web"))
        for v in range(rng.choice([0, 0, 1, 2, 3]) if i < 120 else 0):
            edited = list(toks)
            for _ in range(rng.randint(1, 4)):
                edited[rng.randrange(len(edited))] = rng.choice(vocab) if lang == "en" else chr(CJK_BASE + 3001)
            vid = f"{base_id}v{v}"
            docs.append(Document(vid, sep.join(edited), "web"))
            family[vid] = family[base_id] = base_id
    rng.shuffle(docs)
    return docs, family


def true_jaccard(step: MinHashDedup, a: str, b: str) -> float:
    sa, sb = set(step.shingles(a).tolist()), set(step.shingles(b).tolist())
    return len(sa & sb) / len(sa | sb)


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_planted_near_duplicates_found(tmp_path: Path, lang: str) -> None:
    docs, family = planted(lang)
    step = MinHashDedup()
    by_id = {d.id: d for d in docs}
    # Every planted copy really is a near duplicate of its base (Jaccard >= 0.8 on the step's shingles).
    assert min(true_jaccard(step, by_id[v].text, by_id[b].text) for v, b in family.items() if v != b) >= 0.8
    removed = run_dedup(step, [docs], tmp_path)
    removed.pop("__summary__")
    members: dict[str, list[str]] = {}
    for d in docs:  # corpus order is key order in one task
        if d.id in family:
            members.setdefault(family[d.id], []).append(d.id)
    expected = {m for ms in members.values() for m in ms[1:]}  # all but the first of each family
    hits = len(expected & removed.keys())
    assert hits / len(expected) >= 0.95, f"recall {hits}/{len(expected)}"
    assert hits / len(removed) >= 0.95, f"precision {hits}/{len(removed)}"
    for rid, detail in removed.items():
        assert family[detail["kept_id"]] == family[rid]
        assert detail["similarity"] >= 0.6


def test_chinese_uses_characters_and_english_words() -> None:
    assert token_hashes("今天天气很好，我们去公园。")[1] is True
    assert token_hashes("The weather is fine, 公园 says the sign.")[1] is False
    tokens, chars = token_hashes("Don't  STOP... the-music!")
    assert not chars and tokens.size == 5  # don t stop the music: punctuation only separates
    assert np.array_equal(tokens, token_hashes("don t stop the music")[0])


def test_same_kept_set_for_any_split_and_task_order(tmp_path: Path) -> None:
    docs, _ = planted("en", seed=3)
    step = MinHashDedup()
    one = run_dedup(step, [docs], tmp_path / "one")
    split = [docs[i : i + 70] for i in range(0, len(docs), 70)]
    many = run_dedup(step, split, tmp_path / "many")
    reordered = run_dedup(step, split, tmp_path / "rev", order=list(reversed(range(len(split)))))
    summaries = [r.pop("__summary__") for r in (one, many, reordered)]
    assert one.keys() == many.keys() == reordered.keys() and one
    assert {k: v["kept_id"] for k, v in many.items()} == {k: v["kept_id"] for k, v in reordered.items()}
    assert {k: v["kept_id"] for k, v in one.items()} == {k: v["kept_id"] for k, v in many.items()}
    assert summaries[1] == summaries[2]


def test_removal_detail_names_smallest_key_cluster_and_similarity(tmp_path: Path) -> None:
    text = " ".join(f"word{i}" for i in range(200))
    near = text.replace("word100 ", "changed ")
    docs = [Document("other", " ".join(f"x{i}" for i in range(200)), "a"), Document("late", near, "a")]
    tasks = [docs, [Document("first", text, "b")]]
    removed = run_dedup(MinHashDedup(max_removed_share=None), tasks, tmp_path)
    summary = removed.pop("__summary__")
    # "late" is in task 0, so its key is smaller than "first"'s (task 1): "late" is kept.
    assert removed == {
        "first": {
            "kept_id": "late",
            "kept_key": doc_key(0, 1),
            "cluster": 0,
            "similarity": pytest.approx(removed["first"]["similarity"]),
        }
    }
    assert 0.85 < removed["first"]["similarity"] <= 1
    assert summary["removed_by_source"] == {"b": 1} and summary["docs_by_source"] == {"a": 2, "b": 1}
    assert summary["largest_cluster"]["size"] == 2 and summary["largest_cluster"]["kept_id"] == "late"


def test_empty_and_punctuation_only_documents_are_kept(tmp_path: Path) -> None:
    docs = [Document(f"e{i}", t, "s") for i, t in enumerate(["", "...", "!!! ???", "", "  "])]
    removed = run_dedup(MinHashDedup(), [docs], tmp_path)
    summary = removed.pop("__summary__")
    assert removed == {} and summary["signed"] == 0 and summary["docs"] == 5


def test_alarms_stop_before_decisions_are_written(tmp_path: Path) -> None:
    text = " ".join(f"w{i}" for i in range(100))
    docs = [Document(f"c{i}", text + f" tail{i}", "forum") for i in range(5)] + [Document("u", "solo text", "wiki")]
    with pytest.raises(DedupAlarm, match=r"cluster 0 \(kept document 'c0'\) has 5 documents") as err:
        run_dedup(MinHashDedup(max_cluster=4), [docs], tmp_path / "a")
    assert err.value.report["largest_cluster"]["size"] == 5
    assert not list((tmp_path / "a" / "decisions").iterdir())
    with pytest.raises(DedupAlarm, match=r"4 of 5 documents \(80.0%\) of source 'forum'"):
        run_dedup(MinHashDedup(max_removed_share=0.5, alarm_min_docs=5), [docs], tmp_path / "b")
    run_dedup(MinHashDedup(max_removed_share=0.5), [docs], tmp_path / "b2")  # 5 documents: below the floor
    removed = run_dedup(MinHashDedup(max_cluster=None, max_removed_share=None), [docs], tmp_path / "c")
    assert len(removed) == 4 + 1


def test_registered_and_options_validated() -> None:
    assert DEDUP.get("minhash") is MinHashDedup
    with pytest.raises(ValueError, match="shingle_unit"):
        MinHashDedup(shingle_unit="bytes")
    with pytest.raises(ValueError, match="threshold"):
        MinHashDedup(threshold=1.5)


def test_reduce_rejects_signatures_of_another_size(tmp_path: Path) -> None:
    MinHashDedup(bands=2, rows=2).map([(doc_key(0, 0), Document("a", "some words here", "s"))], tmp_path / "m")
    with pytest.raises(ValueError, match="112 permutations"):
        MinHashDedup().reduce([tmp_path / "m"], tmp_path)


@settings(max_examples=40, deadline=None)
@given(st.integers(20, 400), st.integers(0, 400), st.integers(0, 2**31))
def test_signature_estimates_jaccard(common: int, extra: int, seed: int) -> None:
    """The share of agreeing positions is an unbiased Jaccard estimate: within 5 sd over 448 hashes."""
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 2**63, common + 2 * extra, dtype=np.uint64)
    a, b = pool[: common + extra], np.concatenate([pool[:common], pool[common + extra :]])
    sigs = MinHasher(448, seed=seed % 7).signatures([a, b, rng.permutation(a)])
    assert np.array_equal(sigs[0], sigs[2])  # a set's order does not matter
    j = common / (common + 2 * extra)
    assert abs(similarity(sigs[0], sigs[1]) - j) <= 5 * np.sqrt(j * (1 - j) / 448) + 1e-9


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)), min_size=1, max_size=60), st.randoms())
def test_components_match_union_find(edges: list[tuple[int, int]], rnd: random.Random) -> None:
    keys = np.array(rnd.sample(range(10_000), 31), np.int64)
    parent = list(range(31))

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for u, v in edges:
        parent[find(u)] = find(v)
    a, b = np.array([e[0] for e in edges]), np.array([e[1] for e in edges])
    nodes, roots = components(a, b, keys)
    assert set(nodes.tolist()) == {x for e in edges for x in e}
    for n, r in zip(nodes.tolist(), roots.tolist(), strict=True):
        group = [x for x in nodes.tolist() if find(x) == find(n)]
        assert r == min(group, key=lambda x: keys[x])


@given(st.floats(0, 1), st.floats(0, 1), st.integers(1, 40), st.integers(1, 16))
def test_s_curve_is_monotone_probability(s1: float, s2: float, bands: int, rows: int) -> None:
    lo, hi = sorted((s1, s2))
    p_lo, p_hi = candidate_probability(lo, bands, rows), candidate_probability(hi, bands, rows)
    assert 0 <= p_lo <= p_hi <= 1
    assert candidate_probability(hi, bands + 1, rows) >= p_hi >= candidate_probability(hi, bands, rows + 1)
    assert cluster_probability(hi, bands, rows, 0.8) <= p_hi


def test_s_curve_reference_values() -> None:
    assert candidate_probability(0.8, 14, 8) == pytest.approx(0.924, abs=1e-3)  # datatrove's note
    assert midpoint(14, 8) == pytest.approx(0.719, abs=1e-3)
    rates = dict((s, (kind, r)) for s, kind, r in error_rates([0.5, 0.95], 14, 8, 0.75))
    assert rates[0.5][0] == "false positive" and rates[0.5][1] < 1e-3
    assert rates[0.95][0] == "false negative" and rates[0.95][1] < 1e-6
    assert memory_estimate(1000, 14, 8)["signatures_disk"] == 1000 * 112 * 4
    plan = format_plan(docs=2_000_000)
    assert "14 bands x 8 rows = 112 permutations" in plan and "2,000,000 documents" in plan
    assert "896.0 MB" in plan  # 2M x 112 x 4 bytes


def test_key_task_routes_decisions(tmp_path: Path) -> None:
    text = " ".join(f"t{i}" for i in range(60))
    tasks = [[Document("a", text, "s")], [Document("b", text, "s")], [Document("c", text + " x", "s")]]
    removed = run_dedup(MinHashDedup(max_removed_share=None), tasks, tmp_path)
    removed.pop("__summary__")
    assert set(removed) == {"b", "c"} and {d["kept_key"] for d in removed.values()} == {doc_key(0, 0)}
    assert key_task(doc_key(2, 0)) == 2 and (tmp_path / "decisions" / "task000002.jsonl").exists()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from(list("abcXYZ é'-.,!? \n12") + ["今", "天", "。", "İ", "ß", "😀"]),
                        max_size=40), min_size=1, max_size=6), st.sampled_from(["auto", "words", "chars"]))
def test_a_text_hashes_the_same_alone_and_in_a_batch(texts: list[str], unit: str) -> None:
    for text, (tokens, chars) in zip(texts, batch_token_hashes(texts, unit), strict=True):
        alone, alone_chars = token_hashes(text, unit)
        assert np.array_equal(tokens, alone) and chars == alone_chars
