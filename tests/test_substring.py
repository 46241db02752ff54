"""Exact-substring dedup (suffix array) and in-document repeated-sentence removal, run through the
map -> reduce -> load -> apply contract the data stage drives."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.data.dedup import DEDUP
from lmforge.data.dedup.base import doc_key, key_task
from lmforge.data.dedup.sentences import RepeatedSentences, sentence_spans
from lmforge.data.dedup.substring import SubstringDedup
from lmforge.data.document import Document

BOILER = ("Subscribe to our newsletter for weekly updates on gardening, cooking and home repair. " * 2)[:150]


def words(seed: int, n: int) -> str:
    """n pseudo-random words: unique prose, no accidental 100-byte repeats."""
    rng = random.Random(seed)
    return " ".join(
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(n)
    )


def run(step, tasks: list[list[tuple[int, Document]]], tmp: Path) -> tuple[dict, dict[int, tuple]]:
    """Drive the contract like the stage: map per task, one reduce, load + apply per task."""
    tmp = Path(tempfile.mkdtemp(dir=tmp))  # a fresh root, so one test can run several corpora
    dirs = []
    for i, docs in enumerate(tasks):
        d = tmp / f"map-{i}"
        d.mkdir()
        step.map(iter(docs), d)
        dirs.append(d)
    out = tmp / "reduce"
    out.mkdir()
    summary = step.reduce(dirs, out)
    results = {}
    for task in sorted({key_task(k) for docs in tasks for k, _ in docs}):
        decisions = step.load(out, task)
        for docs in tasks:
            for key, doc in docs:
                if key_task(key) == task:
                    results[key] = step.apply(decisions, key, doc)
    return summary, results


def keyed(texts: list[str], task: int = 0) -> list[tuple[int, Document]]:
    return [(doc_key(task, i), Document(f"t{task}d{i}", t, "web")) for i, t in enumerate(texts)]


# ---------------------------------------------------------------- substring


def test_boilerplate_kept_in_first_document_and_cut_from_later_ones(tmp_path):
    texts = [words(1, 40) + " " + BOILER + " " + words(2, 40), BOILER + words(3, 60), words(4, 60) + BOILER]
    summary, res = run(SubstringDedup(), [keyed(texts)], tmp_path)
    first, second, third = (res[doc_key(0, i)] for i in range(3))
    assert first == (first[0], "", {}) and first[0].text == texts[0]
    assert second[0].text == words(3, 60) and third[0].text == words(4, 60)
    assert second[2]["removed_byte_spans"] == [[0, 150]]
    assert third[2]["removed_byte_spans"] == [[len(texts[2]) - 150, len(texts[2])]]
    assert summary["removed_bytes"] == 300 and summary["docs_cut"] == 2 and summary["docs"] == 3


def test_the_smallest_key_keeps_the_span_even_when_it_comes_from_a_later_task_dir(tmp_path):
    a, b = words(5, 50) + BOILER, BOILER + words(6, 50)
    # task dirs listed out of order: corpus order is key order, not list order
    tasks = [keyed([b], task=1), keyed([a], task=0)]
    _, res = run(SubstringDedup(), tasks, tmp_path)
    assert res[doc_key(0, 0)][0].text == a
    assert res[doc_key(1, 0)][0].text == words(6, 50)


def test_spans_shorter_than_min_bytes_are_kept(tmp_path):
    short = BOILER[:99]
    texts = [words(7, 30) + short, words(8, 30) + short + words(9, 5)]
    summary, res = run(SubstringDedup(min_bytes=100), [keyed(texts)], tmp_path)
    assert [res[doc_key(0, i)][0].text for i in range(2)] == texts
    assert summary["spans"] == 0
    _, res = run(SubstringDedup(min_bytes=99), [keyed(texts)], tmp_path)
    assert short not in res[doc_key(0, 1)][0].text


def test_a_repeat_inside_one_document_is_cut_after_its_first_copy(tmp_path):
    text = words(10, 30) + BOILER + words(11, 30) + BOILER + words(12, 30)
    _, res = run(SubstringDedup(), [keyed([text])], tmp_path)
    assert res[doc_key(0, 0)][0].text == words(10, 30) + BOILER + words(11, 30) + words(12, 30)


def test_matches_never_join_two_documents_through_the_separator(tmp_path):
    # "...END" + "START..." repeated across a boundary in one place and inside a document in another
    end, start = "x" * 60 + "END", "START" + "y" * 60
    texts = [words(13, 20) + end, start + words(14, 20), words(15, 20) + end + start + words(16, 20)]
    summary, res = run(SubstringDedup(min_bytes=100), [keyed(texts)], tmp_path)
    assert res[doc_key(0, 2)][0].text == texts[2]
    assert summary["spans"] == 0


def test_a_document_left_too_short_is_dropped_with_its_spans_named(tmp_path):
    texts = [words(17, 80), words(17, 80) + " ok"]
    _, res = run(SubstringDedup(min_chars_left=50), [keyed(texts)], tmp_path)
    doc, reason, detail = res[doc_key(0, 1)]
    assert doc is None and reason == "substring_left=2<50"
    assert detail["removed_byte_spans"] == [[0, len(words(17, 80))]]
    assert detail["kept_chars"] == 3 and detail["first_removed"] == words(17, 80)[:80]


def test_chinese_cuts_land_on_character_boundaries(tmp_path):
    boiler = "版权所有，未经许可不得转载。本网站内容仅供参考，如有疑问请联系客服。" * 2  # 3 bytes a character
    texts = ["今天天气很好。" + boiler, "数据" + boiler[1:] + "结束了，谢谢大家的阅读与支持，再见朋友们。"]
    # min_bytes=100 falls mid-character in most windows; cuts must still decode
    _, res = run(SubstringDedup(min_bytes=100, min_chars_left=1), [keyed(texts)], tmp_path)
    kept = res[doc_key(0, 1)][0].text
    assert kept.startswith("数据") and kept.endswith("结束了，谢谢大家的阅读与支持，再见朋友们。")
    assert boiler[1:] not in kept


def test_a_corpus_above_max_bytes_is_refused_with_the_memory_it_would_need(tmp_path):
    with pytest.raises(ValueError, match="max_bytes=100.*GiB"):
        run(SubstringDedup(max_bytes=100), [keyed([words(18, 40)])], tmp_path)


def test_options_are_checked_and_the_step_is_registered():
    assert DEDUP.get("substring") is SubstringDedup and DEDUP.get("repeated_sentences") is RepeatedSentences
    with pytest.raises(ValueError, match="min_bytes"):
        SubstringDedup(min_bytes=0)
    with pytest.raises(ValueError, match="max_bytes"):
        SubstringDedup(max_bytes=2**31)


def test_keys_must_increase_within_a_task(tmp_path):
    docs = [(doc_key(0, 1), Document("a", "x", "web")), (doc_key(0, 0), Document("b", "y", "web"))]
    with pytest.raises(ValueError, match="increase"):
        SubstringDedup().map(iter(docs), tmp_path)


def test_empty_corpus(tmp_path):
    summary, res = run(SubstringDedup(), [[]], tmp_path)
    assert summary["bytes"] == 0 and summary["spans"] == 0 and res == {}


PIECES = st.text(alphabet=st.sampled_from(list("abc xyz数据清洗模型训练😀🚀é。")), min_size=0, max_size=60)
# disjoint from PIECES, so the planted span can only repeat where it was planted
PLANTED = st.text(alphabet=st.sampled_from(list("中文字符串重复段落QRS🎉")), min_size=25, max_size=60)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pieces=st.lists(PIECES, min_size=2, max_size=8),
    planted=PLANTED,
    where=st.lists(st.tuples(st.integers(0, 7), st.booleans()), min_size=1, max_size=6),
    n_tasks=st.integers(1, 3),
    min_bytes=st.integers(8, 40),
)
def test_property_cuts_match_a_brute_force_oracle_and_do_not_depend_on_the_task_split(
    tmp_path_factory, pieces, planted, where, n_tasks, min_bytes
):
    texts = list(pieces)
    for i, at_end in where:  # plant a multibyte repeat in several documents
        j = i % len(texts)
        texts[j] = texts[j] + planted if at_end else planted + texts[j]
    step = SubstringDedup(min_bytes=min_bytes, min_chars_left=0)
    keys = [doc_key(i % n_tasks, i // n_tasks) for i in range(len(texts))]
    order = sorted(range(len(texts)), key=lambda i: keys[i])
    one = run(step, [[(keys[i], Document(str(i), texts[i], "web")) for i in order]], tmp_path_factory.mktemp("one"))
    split = [
        [(keys[i], Document(str(i), texts[i], "web")) for i in order if key_task(keys[i]) == t] for t in range(n_tasks)
    ]
    many = run(step, split, tmp_path_factory.mktemp("many"))
    assert one[0] == many[0]
    assert {k: (r[0].text, r[1], r[2]) for k, r in one[1].items()} == {
        k: (r[0].text, r[1], r[2]) for k, r in many[1].items()
    }
    raws = [texts[i].encode() for i in order]
    cut = [_cut_positions(one[1][keys[i]][2]) for i in order]
    must, may = _oracle(raws, min_bytes)
    for d, raw in enumerate(raws):
        assert must[d] <= cut[d] <= may[d]
        kept = bytes(b for p, b in enumerate(raw) if p not in cut[d])
        assert one[1][keys[order[d]]][0].text.encode() == kept  # kept bytes are the input's, in order
    # Unless the planted text overlaps itself (say "QQQ..." twice in a row), its first copy is untouched.
    raw = planted.encode()
    if not any(p < len(raw) for p in _oracle([raw + raw], min_bytes)[1][0]):
        first = next(i for i in order if planted in texts[i])
        assert planted in one[1][keys[first]][0].text


def _cut_positions(detail: dict) -> set[int]:
    return {p for s, e in detail.get("removed_byte_spans", []) for p in range(s, e)}


def _oracle(docs: list[bytes], k: int) -> tuple[list[set[int]], list[set[int]]]:
    """Brute force, per document: bytes that must be cut (a k-window seen at an earlier corpus
    position, minus the 3 bytes at each end that snapping to characters may keep) and bytes that
    may be cut (anywhere in such a window)."""
    first_at: dict[bytes, tuple[int, int]] = {}
    must: list[set[int]] = [set() for _ in docs]
    may: list[set[int]] = [set() for _ in docs]
    for d, raw in enumerate(docs):
        for p in range(len(raw) - k + 1):
            window = raw[p : p + k]
            if window in first_at:
                must[d].update(range(p + 3, p + k - 3))
                may[d].update(range(p, p + k))
            else:
                first_at[window] = (d, p)
    return must, may


def test_snapping_never_splits_a_character_on_random_byte_windows(tmp_path):
    rng = np.random.default_rng(0)
    alphabet = list("数据😀éa ")
    base = "".join(rng.choice(alphabet, 400))
    texts = ["".join(rng.choice(alphabet, 50)) + base[i:] for i in range(0, 12, 1)]
    _, res = run(SubstringDedup(min_bytes=17, min_chars_left=0), [keyed(texts)], tmp_path)
    for i, (doc, _, detail) in enumerate(res[doc_key(0, i)] for i in range(len(texts))):
        raw = texts[i].encode()
        for s, e in detail.get("removed_byte_spans", []):
            raw[s:e].decode("utf-8")  # raises if a span boundary is inside a character
        assert i == 0 or len(doc.text) < len(texts[i])


# ---------------------------------------------------------------- repeated sentences


def test_repeated_sentences_removes_later_copies_only():
    s = "Click here to subscribe to our newsletter."
    text = f"Intro paragraph about something important here. {s} Middle part of the text goes on. {s}\n\nEnd. {s}"
    doc, reason, detail = RepeatedSentences(min_chars=20, min_chars_left=10).apply(None, 0, Document("a", text, "web"))
    assert reason == "" and doc.text.count(s) == 1
    assert doc.text == f"Intro paragraph about something important here. {s} Middle part of the text goes on.\n\nEnd."
    assert detail["removed_sentences"] == 2 and detail["first_removed"] == s


def test_short_sentences_are_kept_and_clean_documents_untouched():
    text = "Yes. No. Yes. No. Yes. This sentence is long enough to count for removal rules."
    step = RepeatedSentences(min_chars=20)
    doc = Document("a", text, "web")
    assert step.apply(None, 0, doc) == (doc, "", {})


def test_repeated_sentences_in_chinese_and_lines_without_terminators():
    menu = "首页 | 新闻 | 体育 | 娱乐 | 财经 | 科技 | 联系我们"
    a, b = "数据清洗是训练大模型的重要步骤。", "我们今天讨论去重的方法。"
    text = f"{menu}\n{a}{b}{a}\n{menu}"
    doc, _, detail = RepeatedSentences(min_chars=10, min_chars_left=5).apply(None, 0, Document("a", text, "web"))
    assert doc.text == f"{menu}\n{a}{b}"
    assert detail["removed_sentences"] == 2 and detail["removed_char_spans"] == [
        [len(menu) + 1 + len(a + b), len(text)]
    ]


def test_whitespace_differences_still_match_and_a_document_of_repeats_is_dropped():
    s = "Buy the best shoes online today at low prices."
    text = f"{s} {s.replace(' ', '  ')}\n{s}"
    doc, reason, detail = RepeatedSentences(min_chars=20, min_chars_left=50).apply(None, 0, Document("a", text, "web"))
    assert doc is None and reason == f"sentences_left={len(s)}<50" and detail["removed_sentences"] == 2


@given(st.text(alphabet=st.sampled_from(list("ab. \n。数")), max_size=80))
def test_sentence_spans_tile_the_text(text):
    spans = sentence_spans(text)
    assert "".join(text[a:b] for a, b in spans) == text
    assert all(b > a for a, b in spans)


def test_repeated_sentences_map_reduce_are_trivial(tmp_path):
    step = RepeatedSentences()
    step.map(iter(keyed(["a. a."])), tmp_path)
    assert step.reduce([tmp_path], tmp_path) == {} and step.load(tmp_path, 0) is None
    assert list(tmp_path.iterdir()) == []
