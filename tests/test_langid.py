"""The `langid` rule: py3langid's model names the language, meta records it, and the language list
and minimum probability drop what they should, with reasons that say which limit was hit."""

from __future__ import annotations

import json

import pytest

from lmforge.config import ConfigError
from lmforge.data.document import Document
from lmforge.data.filters import build_filter
from lmforge.data.filters.base import OptionError
from lmforge.data.filters.langid import LangId, identify
from lmforge.data.ledger import Ledger

EN = "The committee met on Tuesday to discuss the plans for the new library and the budget for next year."
ZH = "委员会在星期二开会，讨论了新图书馆的计划和明年的预算，大家都同意尽快开始施工。"
DE = "Der Ausschuss traf sich am Dienstag, um die Pläne für die neue Bibliothek und das Budget zu besprechen."


def doc(text: str, id: str = "d", **meta) -> Document:
    return Document(id=id, text=text, source="web", meta=meta)


@pytest.mark.parametrize(("text", "lang"), [(EN, "en"), (ZH, "zh"), (DE, "de")])
def test_identifies_the_language_and_records_it_in_meta(text: str, lang: str):
    original = doc(text, upvotes=3)
    new, reason = LangId().process(original)
    assert reason == "" and new is not None
    assert new.meta["language"] == lang
    assert 0.65 <= new.meta["language_prob"] <= 1.0
    assert new.meta["upvotes"] == 3 and new.text == text
    assert "language" not in original.meta  # rules never mutate their input


def test_language_list_keeps_listed_and_drops_others_naming_the_language():
    rule = LangId(languages=["en", "zh"])
    assert rule.process(doc(EN))[0] is not None
    assert rule.process(doc(ZH))[0] is not None
    assert rule.process(doc(DE)) == (None, "lang=de")


def test_min_prob_drops_uncertain_text_and_zero_only_annotates():
    lang, prob = identify("ok sure")  # too little text to tell: spread over many languages
    assert prob < 0.65
    assert LangId().process(doc("ok sure")) == (None, f"lang_prob={prob:.3f}<0.65")
    kept, _ = LangId(min_prob=0).process(doc("ok sure"))
    assert kept is not None and kept.meta["language"] == lang
    # The same threshold on a confident guess keeps it.
    assert LangId(min_prob=0.9).process(doc(EN))[0] is not None


def test_max_chars_classifies_only_the_prefix():
    text = EN + " " + " ".join([DE] * 6)
    assert identify(text)[0] == "de"
    assert identify(text, max_chars=len(EN))[0] == "en"
    assert LangId(max_chars=len(EN)).process(doc(text))[0].meta["language"] == "en"


def test_bad_options_name_the_key():
    with pytest.raises(OptionError, match="languages: unknown to the model: xx"):
        LangId(languages=["en", "xx"])
    with pytest.raises(OptionError, match="min_prob: is a probability"):
        LangId(min_prob=1.5)
    with pytest.raises(OptionError, match="languages: expected a non-empty list"):
        LangId(languages=[])
    with pytest.raises(ConfigError, match=r"^data.filters\[2\].max_chars: expected an integer"):
        build_filter({"name": "langid", "max_chars": 1.5}, 2)
    assert LangId(languages="en").languages == frozenset({"en"})  # a YAML scalar means one language


def test_runs_as_a_pipeline_step_with_reasons_in_the_ledger(tmp_path):
    step = build_filter({"name": "langid", "languages": ["en", "zh"], "skip_sources": ["code"]}, 0)
    docs = [doc(EN, "a"), doc(DE, "b"), doc(ZH, "c"), Document("d", "def f(): pass", "code")]
    with Ledger(tmp_path / "removed.jsonl") as ledger:
        kept = list(step(iter(docs), ledger))
    assert [d.id for d in kept] == ["a", "c", "d"]
    assert [d.meta.get("language") for d in kept] == ["en", "zh", None]
    removed = [json.loads(line) for line in (tmp_path / "removed.jsonl").read_text().splitlines()]
    assert [(r["id"], r["step"], r["reason"]) for r in removed] == [("b", "langid", "lang=de")]
