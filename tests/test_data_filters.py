"""Filters, text statistics and exact dedup: each rule at its threshold boundaries, CJK included."""

from __future__ import annotations

import json
import re

import pytest

from lmforge.config import ConfigError
from lmforge.data import textstats
from lmforge.data.dedup import ExactDedup, doc_key
from lmforge.data.document import Document
from lmforge.data.filters import FILTERS, build_filter
from lmforge.data.ledger import Ledger


def doc(text: str, source: str = "web", id: str = "d", **meta) -> Document:
    return Document(id=id, text=text, source=source, meta=meta)


def keep(spec: dict, text: str, **kw) -> tuple[bool, str]:
    return build_filter(spec, 0).rule.keep(doc(text, **kw))


def english(n: int) -> str:
    """n distinct-enough words, with stop words, no symbols."""
    return " ".join(["the"] + [f"w{i}" for i in range(n - 1)])


# ---------------------------------------------------------------- textstats


def test_words_counts_each_cjk_character_and_splits_mixed_runs():
    assert textstats.words("Hello, 世界！abc123 かなカナ 한국 naïve déjà-vu") == [
        "Hello", "世", "界", "abc123", "か", "な", "カ", "ナ", "한", "국", "naïve", "déjà", "vu",
    ]
    assert textstats.words("数据abc清洗") == ["数", "据", "abc", "清", "洗"]


def test_sentences_split_on_latin_and_cjk_terminators_but_not_inside_numbers():
    assert textstats.sentences("Pi is 3.14. Really? Yes! 你好。世界！好；end") == [
        "Pi is 3.14.", "Really?", "Yes!", "你好。", "世界！", "好；", "end",
    ]


# ---------------------------------------------------------------- seed rules


def test_min_words_boundary_english_and_chinese():
    spec = {"name": "min_words", "min_words": 25}
    assert keep(spec, english(25)) == (True, "")
    assert keep(spec, english(24)) == (False, "words=24<25")
    assert keep(spec, "中" * 25)[0]
    assert keep(spec, "中文" * 12) == (False, "words=24<25")
    # Mixed: 20 Chinese characters + 5 English words = 25.
    assert keep(spec, "数" * 20 + " a b c d e")[0]


def test_symbol_ratio_counts_hashes_and_ellipses_per_word():
    spec = {"name": "symbol_ratio", "max_ratio": 0.1}
    assert keep(spec, english(30) + " ###") == (True, "")  # 3/30 = 0.1, at the limit
    kept, reason = keep(spec, english(29) + " ###")
    assert not kept and reason.startswith("symbol_ratio=0.103")
    assert not keep(spec, english(10) + " ... …")[0]  # 2 ellipses / 10 words
    assert keep(spec, english(20) + " ... …")[0]  # 2 / 20
    assert not keep(spec, "#")[0]  # symbols and no words at all
    assert keep(spec, "")[0]


def test_symbol_ratio_on_chinese_counts_characters_as_words():
    spec = {"name": "symbol_ratio", "max_ratio": 0.1}
    assert keep(spec, "中" * 10 + "…")[0]
    assert not keep(spec, "中" * 9 + "…")[0]


def test_stop_words_english_by_whole_word_chinese_by_substring():
    spec = {"name": "stop_words"}
    assert keep(spec, "The cat sat") == (True, "")
    assert keep(spec, "theory without common words") == (False, "stop_words=0<1")
    assert keep(spec, "我们的数据")[0]
    assert keep(spec, "数据清洗流程") == (False, "stop_words=0<1")
    two = {"name": "stop_words", "min_count": 2}
    assert not keep(two, "the cat")[0]
    assert keep(two, "the cat and dog")[0]
    assert keep(two, "数据的质量是关键")[0]
    custom = {"name": "stop_words", "words": ["cat"]}
    assert keep(custom, "a cat")[0] and not keep(custom, "the dog")[0]


def test_max_repeats_words_and_sentences():
    spec = {"name": "max_repeats", "max_repeats": 3}
    assert keep(spec, "spam " * 3 + "eggs")[0]
    assert keep(spec, "spam " * 4 + "eggs") == (False, "word 'spam' x4>3")
    assert not keep(spec, "好" * 4)[0], "CJK characters are words"
    assert keep(spec, "Buy now. " * 3)[0]
    assert keep(spec, "Buy now. " * 4) == (False, "sentence 'Buy now.' x4>3")
    assert keep(spec, "点击这里。" * 3)[0]
    assert keep(spec, "点击这里。" * 4) == (False, "sentence '点击这里。' x4>3")
    # A lower sentence limit catches repeated boilerplate while words may repeat more.
    loose_words = {"name": "max_repeats", "max_repeats": 100, "max_sentence_repeats": 2}
    assert keep(loose_words, "the cat. the dog. the cow. the hen.")[0]
    assert not keep(loose_words, "Subscribe! Subscribe! Subscribe!")[0]


def test_max_repeats_default_threshold_is_100():
    spec = {"name": "max_repeats"}
    assert keep(spec, "buy " * 100)[0]
    assert not keep(spec, "buy " * 101)[0]


def test_strip_html_removes_tags_scripts_comments_and_unescapes():
    step = build_filter({"name": "strip_html"}, 0)
    d = doc("<html><head><style>p {color: red}</style><script>var a = 1 < 2;</script></head>"
            "<body><!-- nav --><p>Fish &amp; chips</p><p>cost &lt; &#36;5</p>a < b and c > d</body></html>")
    out = step.rule.apply(d)
    assert out.text == "Fish & chips\n\ncost < $5\na < b and c > d"  # adjacent blocks: one blank line
    assert d.text.startswith("<html>"), "the input document is not mutated"
    assert (out.id, out.source) == (d.id, d.source)


def test_min_upvotes_metadata_rule():
    spec = {"name": "min_upvotes"}
    assert keep(spec, "x", upvotes=3)[0]
    assert keep(spec, "x", upvotes=2) == (False, "upvotes=2<3")
    assert keep(spec, "x")[0], "documents without the key are not forum posts"
    assert not keep(spec, "x", upvotes="lots")[0]
    assert not keep({"name": "min_upvotes", "min_upvotes": 10, "key": "score"}, "x", score=9)[0]


# ---------------------------------------------------------------- building from recipes


def test_registry_has_the_seed_rules():
    assert {"min_words", "symbol_ratio", "stop_words", "max_repeats", "strip_html", "min_upvotes"} <= set(
        FILTERS.names()
    )


@pytest.mark.parametrize(
    ("spec", "where"),
    [
        ({"name": "min_wordz"}, "data.filters[3].name"),
        ({"min_words": 3}, "data.filters[3].name"),
        ({"name": "min_words", "min_wrds": 3}, "data.filters[3].min_wrds"),
        ({"name": "min_words", "min_words": -1}, "data.filters[3].min_words"),
        ({"name": "min_words", "min_words": "25"}, "data.filters[3].min_words"),
        ({"name": "symbol_ratio", "max_ratio": True}, "data.filters[3].max_ratio"),
        ({"name": "stop_words", "words": []}, "data.filters[3].words"),
        ({"name": "min_words", "sources": [1]}, "data.filters[3].sources"),
        ({"name": "min_words", "skip_sources": {"a": 1}}, "data.filters[3].skip_sources"),
    ],
)
def test_bad_filter_specs_name_the_recipe_key(spec, where):
    with pytest.raises(ConfigError, match="^" + re.escape(where) + ":"):
        build_filter(spec, 3)


def test_sources_restrict_a_filter_and_others_pass_untouched(tmp_path):
    step = build_filter({"name": "min_words", "min_words": 5, "sources": ["prose"]}, 0)
    docs = [doc("too short", "prose", "p1"), doc("too short", "code", "c1"), doc(english(5), "prose", "p2")]
    with Ledger(tmp_path / "removed.jsonl") as ledger:
        kept = list(step(iter(docs), ledger))
    assert [d.id for d in kept] == ["c1", "p2"]
    assert kept[0] is docs[1]
    removed = [json.loads(line) for line in (tmp_path / "removed.jsonl").read_text().splitlines()]
    assert removed == [{"id": "p1", "source": "prose", "step": "min_words", "reason": "words=2<5", "detail": {}}]


def test_skip_sources_exempt_labels_and_cover_unknown_ones():
    step = build_filter({"name": "min_words", "min_words": 5, "skip_sources": ["code"]}, 0)
    docs = [doc("too short", "code", "c1"), doc("too short", "my_forum", "f1"), doc(english(5), "web", "w1")]
    assert [d.id for d in step(iter(docs), Ledger())] == ["c1", "w1"]


def test_transform_applies_only_to_listed_sources():
    step = build_filter({"name": "strip_html", "sources": "web"}, 0)
    docs = [doc("<b>x</b>", "web"), doc("<b>x</b>", "code")]
    assert [d.text for d in step(iter(docs), Ledger())] == ["x", "<b>x</b>"]


# ---------------------------------------------------------------- exact dedup


def run_dedup(step, tasks: list[list[Document]], root) -> list[tuple[str, str, dict]]:
    """The stage's map -> reduce -> apply over `tasks`; (id, reason, detail) per document, in key order."""
    dirs = []
    for t, docs in enumerate(tasks):
        (root / f"map{t}").mkdir()
        step.map([(doc_key(t, i), d) for i, d in enumerate(docs)], root / f"map{t}")
        dirs.append(root / f"map{t}")
    (root / "reduce").mkdir()
    step.reduce(dirs, root / "reduce")
    out = []
    for t, docs in enumerate(tasks):
        decisions = step.load(root / "reduce", t)
        for i, d in enumerate(docs):
            kept, reason, detail = step.apply(decisions, doc_key(t, i), d)
            out.append((d.id, reason if kept is None else "kept", detail))
    return out


@pytest.mark.parametrize("split", [1, 2, 5])
def test_exact_dedup_keeps_the_first_in_corpus_order_on_any_task_split(tmp_path, split):
    docs = [
        doc("hello  world\n", id="a"),
        doc("something else", id="b"),
        doc(" hello world", "other-source", id="c"),  # same after whitespace normalisation
        doc("Hello world", id="d"),  # case differs: not an exact duplicate
        doc("hello\tworld", id="e"),
    ]
    tasks = [docs[i:i + split] for i in range(0, len(docs), split)]
    results = run_dedup(ExactDedup(), tasks, tmp_path)
    assert [(i, r) for i, r, _ in results] == [("a", "kept"), ("b", "kept"), ("c", "duplicate"), ("d", "kept"),
                                               ("e", "duplicate")]
    details = [d for _, r, d in results if r == "duplicate"]
    assert [d["kept_id"] for d in details] == ["a", "a"] and details[0]["kept_key"] == doc_key(0, 0)
    assert details[0]["hash"] == details[1]["hash"] and len(details[0]["hash"]) == 32  # xxh3-128 in hex


def test_exact_dedup_keeps_code_indentation_apart(tmp_path):
    code = "def f():\n    return 1\n"
    docs = [doc(code, "code", id="a"), doc(code.replace("    ", "  "), "code", id="b"),
            doc(code + "   \n", "code", id="c"), doc(code.replace("    ", "  "), id="d"),
            doc(code.replace("    ", " "), id="e")]
    results = {i: r for i, r, _ in run_dedup(ExactDedup(), [docs], tmp_path)}
    # Code: indentation matters, trailing whitespace does not; prose collapses all whitespace.
    assert results == {"a": "kept", "b": "kept", "c": "duplicate", "d": "kept", "e": "duplicate"}


def test_strip_html_drops_unclosed_invisible_elements_to_the_end():
    """An unclosed <script> or comment runs to the end of the page, as in a browser; the scan is one
    pass (the foundation's lazy regex rescanned the rest of the page for each one: quadratic)."""
    assert FILTERS.build("strip_html").apply(doc("text<script>x " * 3 + "<!-- y " * 2)).text == "text"
    html_doc = doc("<p>keep</p><script>drop</script><!-- c --><STYLE a=1>drop</style >tail<script>rest")
    assert FILTERS.build("strip_html").apply(html_doc).text == "keep\ntail"
