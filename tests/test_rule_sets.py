"""The published rule sets (gopher_quality, gopher_repetition, c4, fineweb): each rule on both sides of
its threshold in English and Chinese, clean prose kept, junk dropped, and the fast paths against
plain reference implementations."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.config import ConfigError
from lmforge.data import textstats
from lmforge.data.document import Document
from lmforge.data.filters import FILTERS, build_filter
from lmforge.data.filters.gopher import _english_counts, duplicated_n_gram_chars, n_grams, top_n_gram_chars

RULE_SETS = ("gopher_quality", "gopher_repetition", "c4", "fineweb")
ROOT = Path(__file__).resolve().parents[1]
SEEDS = next((p for p in (ROOT / "shared" / "seeds", ROOT.parent / "shared" / "seeds") if p.is_dir()), None)


def run(name: str, text: str, **options) -> tuple[bool, str]:
    """(kept, reason) of one registered rule with `options`, for a Filter or the C4 Rewriter alike."""
    rule = FILTERS.build(name, **options)
    doc = Document(id="d", text=text, source="web")
    if name == "c4":
        out, reason = rule.process(doc)
        return out is not None, reason
    return rule.keep(doc)


def chain_keeps(text: str) -> bool:
    """All four rule sets in order, C4's rewrite feeding FineWeb."""
    doc = Document(id="d", text=text, source="web")
    for name in RULE_SETS:
        rule = FILTERS.build(name)
        if name == "c4":
            doc, _ = rule.process(doc)
            if doc is None:
                return False
        elif not rule.keep(doc)[0]:
            return False
    return True


# ---------------------------------------------------------------- fixtures: clean prose

EN_SENTENCES = [
    "The city council approved a new budget for public transport on Tuesday evening.",
    "Officials said that the plan would add more buses to the busiest routes by the end of the year.",
    "Several residents spoke at the meeting and asked for safer crossings near the schools.",
    "The mayor told reporters that the money had been set aside after a long review of the accounts.",
    "Local businesses have welcomed the decision, saying that better service will bring more customers.",
    "A spokesperson for the transport authority confirmed that fares will not change this year.",
    "Engineers expect the work on the northern bridge to be finished before the winter.",
    "Critics argue that the council should have consulted the neighbouring towns first.",
    "According to the latest survey, most commuters still travel to work by car.",
    "The report also found that cycling has doubled in the centre over the past five years.",
    "Researchers at the university have been studying traffic patterns with data from sensors.",
    "They found that delays were worst on Monday mornings and Friday afternoons.",
    "The new timetable will be published online and at every station next month.",
    "Drivers will be able to test the electric buses during a trial that starts in spring.",
    "Some members of the opposition voted against the budget, citing concerns about its cost.",
    "The council will meet again in March to review the progress of the project.",
    "Farmers in the valley have reported an early harvest after a warm and dry summer.",
    "Prices at the weekly market fell slightly as more vegetables reached the stalls.",
    "The regional museum reopened its doors after two years of careful restoration work.",
    "Visitors can now see the collection of old maps that was hidden in storage for decades.",
    "Teachers have asked for more time to prepare the new science course for older pupils.",
    "The hospital has hired twenty nurses to shorten the waiting times in its emergency ward.",
    "Heavy rain caused flooding in two villages, and the fire service pumped water from homes.",
    "No one was injured, but several roads remained closed until the following afternoon.",
    "The football club announced that its stadium will host a charity match in June.",
    "Tickets will be sold at a reduced price to families and students with a valid card.",
    "A local author has won a national prize for a novel about life on the coast.",
    "She said that the book took her almost seven years to write and rewrite.",
    "The library will extend its opening hours during the exam period at the end of May.",
    "Volunteers planted more than three hundred trees along the river over the weekend.",
]


def english_articles(n: int, seed: int = 0) -> list[str]:
    """News-like English pages of about 2 KB: paragraphs of 2-4 sentences, no sentence twice per page."""
    rng = random.Random(seed)
    pages = []
    for _ in range(n):
        sentences = rng.sample(EN_SENTENCES, 24)
        paragraphs, i = [], 0
        while i < len(sentences):
            k = rng.randint(2, 4)
            paragraphs.append(" ".join(sentences[i : i + k]))
            i += k
        pages.append("\n\n".join(paragraphs))
    return pages


def seed_paragraphs() -> list[str]:
    """Edited Chinese prose paragraphs from the seed documents: markdown, code, math, lists, headings
    and tables left out, emphasis marks removed; only paragraphs of 20+ Chinese characters that end a
    sentence."""
    if SEEDS is None:
        pytest.skip("shared/seeds (Chinese source documents) not found beside the repository")
    paragraphs = []
    for path in sorted(SEEDS.glob("*.txt")):
        in_block = False
        for line in path.read_text(encoding="utf-8").splitlines():
            s = line.strip()
            if s.startswith(("```", "$$")):
                in_block = not in_block
                continue
            if in_block or not s or s[0] in "#-*|<>!$[0123456789" or "$" in s or "{" in s:
                continue
            s = re.sub(r"\*\*|`", "", s)
            if len(re.findall(r"[\u4e00-\u9fff]", s)) >= 20 and s.endswith(("。", "！", "？", "；", "”")):
                paragraphs.append(s)
    return paragraphs


@pytest.fixture(scope="module")
def zh_articles() -> list[str]:
    """Two hundred ~2 KB Chinese articles, each a random run of distinct seed paragraphs."""
    paragraphs = seed_paragraphs()
    assert len(paragraphs) >= 40, "the seeds should hold dozens of prose paragraphs"
    rng = random.Random(0)
    pages = []
    for _ in range(200):
        page, size = [], 0
        for p in rng.sample(paragraphs, len(paragraphs)):
            page.append(p)
            size += len(p.encode())
            if size >= 2000:
                break
        pages.append("\n\n".join(page))
    return pages


# ---------------------------------------------------------------- fixtures: junk

NAV_EN = "\n".join(["Home", "News", "Sport", "Business", "Weather", "Contact us", "About", "Sitemap"] * 8)
NAV_ZH = "\n".join(["首页", "新闻", "体育", "财经", "娱乐", "科技", "汽车", "房产", "联系我们", "网站地图"] * 8)
JUNK = {
    "menu_en": "Menu\n" + NAV_EN,
    "menu_zh": "导航\n" + NAV_ZH,
    "nav_list_en": "\n".join(f"- {w}" for w in NAV_EN.splitlines()),
    "nav_list_zh": "\n".join(f"● {w}" for w in NAV_ZH.splitlines()),
    "repeated_lines_en": "\n".join(["Click here to subscribe to our newsletter and win a prize today."] * 12),
    "repeated_lines_zh": "\n".join(["点击这里订阅我们的新闻通讯，今天就有机会赢取大奖。"] * 12),
    "keyword_spam_en": " ".join(["cheap phones buy cheap phones best cheap phones online"] * 20),
    "keyword_spam_zh": "，".join(["便宜手机批发价格最低的手机在线购买"] * 20) + "。",
    "cookie_en": "This website uses cookies to improve your experience. By continuing you accept our cookie "
    "policy.\nPrivacy policy and terms of use apply to all visitors.\nAccept\nDecline",
    "cookie_zh": "本网站使用cookie来改善您的浏览体验。继续浏览即表示您同意我们的隐私政策。\n"
    "访问本网站须遵守使用条款。\n接受\n拒绝",
    "lorem_en": english_articles(1)[0] + "\n\nLorem ipsum dolor sit amet, consectetur adipiscing elit, sed do.",
    "lorem_zh": "\n\n".join(["这是一个页面模板，正文内容将在稍后由编辑填写完成。"] * 1)
    + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.",
}


# ---------------------------------------------------------------- clean prose kept, junk dropped


@pytest.mark.parametrize("name", RULE_SETS)
def test_each_rule_set_keeps_clean_chinese_news(zh_articles, name):
    kept = [run(name, a) for a in zh_articles]
    share = sum(k for k, _ in kept) / len(kept)
    reasons = Counter(r for k, r in kept if not k).most_common(3)
    assert share >= 0.95, f"{name} kept {share:.1%} of clean Chinese articles; top reasons {reasons}"


def test_whole_chain_keeps_clean_chinese_news(zh_articles):
    assert sum(map(chain_keeps, zh_articles)) / len(zh_articles) >= 0.95


def test_chain_keeps_clean_english_news():
    pages = english_articles(40)
    assert sum(map(chain_keeps, pages)) / len(pages) >= 0.95


@pytest.mark.parametrize("kind", sorted(JUNK))
def test_chain_drops_junk_in_both_languages(kind):
    assert not chain_keeps(JUNK[kind])


@pytest.mark.parametrize(
    ("kind", "name", "reason"),
    [
        ("menu_en", "fineweb", "fineweb_punct_lines"),
        ("menu_zh", "fineweb", "fineweb_punct_lines"),
        ("nav_list_en", "gopher_quality", "gopher_bullet_lines"),
        ("nav_list_zh", "gopher_quality", "gopher_bullet_lines"),
        ("repeated_lines_en", "gopher_repetition", "gopher_dup_lines"),
        ("repeated_lines_zh", "gopher_repetition", "gopher_dup_lines"),
        ("keyword_spam_en", "gopher_repetition", "gopher_top_2_gram"),
        ("keyword_spam_zh", "gopher_repetition", "gopher_top_2_gram"),
        ("cookie_en", "c4", "c4_sentences"),
        ("cookie_zh", "c4", "c4_sentences"),
        ("lorem_en", "c4", "c4_lorem_ipsum"),
        ("lorem_zh", "c4", "c4_lorem_ipsum"),
    ],
)
def test_junk_is_dropped_by_the_rule_meant_for_it(kind, name, reason):
    kept, why = run(name, JUNK[kind])
    assert not kept and why.startswith(reason), why


# ---------------------------------------------------------------- gopher_quality, rule by rule


def en_words(n: int) -> str:
    """`n` five-letter-ish words with two stop words, no punctuation."""
    return " ".join(["the", "and"] + [f"word{chr(97 + i % 26)}" for i in range(n - 2)])


def zh_chars(n: int) -> str:
    """`n` Chinese characters (no punctuation) of ordinary prose, with stop words 的 and 是."""
    base = "今天的天气是晴天我们一起去公园散步看到很多人在湖边钓鱼孩子们在草地上放风筝"
    return (base * (n // len(base) + 1))[:n]


@pytest.mark.parametrize(("make", "n"), [(en_words, 50), (zh_chars, 50)])
def test_gopher_min_words_counts_words_or_chinese_characters(make, n):
    assert run("gopher_quality", make(n))[0]
    kept, reason = run("gopher_quality", make(n - 1))
    assert not kept and reason == f"gopher_words={n - 1}<50"


def test_gopher_max_words():
    assert run("gopher_quality", en_words(120), max_words=120)[0]
    assert run("gopher_quality", en_words(121), max_words=120) == (False, "gopher_words=121>120")
    assert run("gopher_quality", zh_chars(121), max_words=120) == (False, "gopher_words=121>120")


def test_gopher_mean_word_length_english_range():
    short = " ".join(["the", "and"] + ["ab"] * 60)  # mean just over 2
    long = " ".join(["the", "and"] + ["abcdefghijkl"] * 60)
    assert run("gopher_quality", short)[1].startswith("gopher_mean_word_length=")
    assert run("gopher_quality", long)[1].startswith("gopher_mean_word_length=")
    assert run("gopher_quality", short, min_avg_word_length=2)[0]


def test_gopher_mean_word_length_uses_jieba_words_and_its_own_range_for_chinese():
    text = zh_chars(200)
    mean = sum(map(len, textstats.word_tokens(textstats.tokens(text)))) / len(
        textstats.word_tokens(textstats.tokens(text))
    )
    assert 1.2 < mean < 3, "ordinary Chinese averages under 3 characters a jieba word"
    assert run("gopher_quality", text)[0]
    assert run("gopher_quality", text, zh_min_avg_word_length=mean + 0.01)[1].startswith("gopher_mean_word_length")
    assert run("gopher_quality", text, zh_max_avg_word_length=mean - 0.01)[1].startswith("gopher_mean_word_length")


@pytest.mark.parametrize(("symbol", "name"), [("#", "hash"), ("...", "ellipsis"), ("……", "ellipsis")])
def test_gopher_symbol_ratio(symbol, name):
    # 100 units (words or Chinese characters); a symbol also counts as a token itself.
    # Symbols first: a line ending in "..." is another rule. Each symbol is a token too, so English is
    # at 10/110 and 12/112 per token; jieba splits "..." into three tokens, hence the wider Chinese gap.
    for base, keep_n, drop_n in ((en_words(100), 10, 12), (zh_chars(100), 5, 30)):
        assert run("gopher_quality", f"{symbol} " * keep_n + base)[0]
        kept, reason = run("gopher_quality", f"{symbol} " * drop_n + base)
        assert not kept and reason.startswith(f"gopher_{name}_ratio="), reason


@pytest.mark.parametrize("bullet", ["-", "•", "●"])
def test_gopher_bullet_lines(bullet):
    lines = [f"{bullet} {en_words(12)}" for _ in range(9)]
    assert run("gopher_quality", "\n".join(lines + [en_words(12)]))[0]  # 90%: at the limit
    kept, reason = run("gopher_quality", "\n".join(lines + [f"{bullet} x"]))
    assert not kept and reason == "gopher_bullet_lines=1.00>0.9"


@pytest.mark.parametrize("ending", ["...", "…", "……"])
def test_gopher_ellipsis_lines(ending):
    good = [zh_chars(30) + "。"] * 7
    assert run("gopher_quality", "\n".join(good + [zh_chars(30) + ending] * 3))[0]  # 30%
    kept, reason = run("gopher_quality", "\n".join(good[:6] + [zh_chars(30) + ending] * 4))
    assert not kept and reason == "gopher_ellipsis_lines=0.40>0.3"


def test_gopher_alphabetic_word_share():
    numbers = " ".join(str(i) for i in range(25))
    assert run("gopher_quality", en_words(100) + " " + numbers)[0]  # 100/125 = 0.8
    kept, reason = run("gopher_quality", en_words(100) + " " + numbers + " 99")
    assert not kept and reason == "gopher_alpha_words=0.79<0.8"
    kept, reason = run("gopher_quality", zh_chars(100) + " " + numbers + " 99")
    assert not kept and reason.startswith("gopher_alpha_words=")


def test_gopher_stop_words_english_and_chinese():
    words = [f"word{chr(97 + i % 26)}" for i in range(60)]
    assert run("gopher_quality", " ".join(words)) == (False, "gopher_stop_words=0<2")
    assert run("gopher_quality", " ".join(["the"] + words)) == (False, "gopher_stop_words=1<2")
    assert run("gopher_quality", " ".join(["the", "with"] + words))[0]
    no_stop = "天气晴朗公园散步湖边钓鱼草地风筝" * 5
    assert run("gopher_quality", no_stop) == (False, "gopher_stop_words=0<2")
    assert run("gopher_quality", "我们" + no_stop + "的书是新的")[0]


# ---------------------------------------------------------------- gopher_repetition, rule by rule


def test_gopher_duplicate_lines_and_paragraphs():
    lines = [f"Line number {i} says something different about topic {i}." for i in range(10)]
    three_dups = "\n".join(lines + lines[:3])  # 3/13 lines repeat an earlier one
    only_fractions = {"dup_line_char_frac": None, "dup_para_char_frac": None, "top_n_grams": [], "dup_n_grams": []}
    assert run("gopher_repetition", three_dups, **only_fractions)[0]
    kept, reason = run("gopher_repetition", "\n".join(lines + lines[:5]), **only_fractions)
    assert not kept and reason == "gopher_dup_lines=0.33>0.3"
    paras = "\n\n".join(lines + lines[:5])
    kept, reason = run("gopher_repetition", paras, **only_fractions)
    assert not kept and reason == "gopher_dup_paras=0.33>0.3"


def test_gopher_duplicate_line_characters_chinese():
    lines = [f"第{i}行讲的是另外一件完全不同的事情，内容并不重复。" for i in range(10)]
    no_n_grams = {"top_n_grams": [], "dup_n_grams": []}
    kept, reason = run("gopher_repetition", "\n".join(lines + lines[:3]), **no_n_grams)
    assert not kept and reason.startswith("gopher_dup_line_chars=0.2")
    assert run("gopher_repetition", "\n".join(lines + lines[:3]), dup_line_char_frac=0.3, **no_n_grams)[0]


def test_gopher_top_n_gram_english_and_chinese_boundary():
    en = "red fox " * 10 + " ".join(f"w{i:03d}" for i in range(40))
    frac = top_n_gram_chars(textstats.tokens(en), 2, 1) / len(en)
    assert run("gopher_repetition", en, top_n_grams=[[2, frac]], dup_n_grams=[])[0]
    kept, reason = run("gopher_repetition", en, top_n_grams=[[2, frac - 0.01]], dup_n_grams=[])
    assert not kept and reason.startswith("gopher_top_2_gram=")
    # Chinese n-grams are jieba words and count no joining spaces.
    zh = "人工智能" * 10 + zh_chars(150)
    toks = textstats.tokens(zh)
    assert top_n_gram_chars(toks, 2, 0) == len("人工智能人工智能") * Counter(n_grams(toks, 2)).most_common(1)[0][1]


def test_gopher_duplicated_n_grams():
    text = " ".join(f"w{i:03d}" for i in range(60))
    repeated = text + " " + " ".join(text.split()[:15])  # 15 words repeated: 11 repeated 5-grams
    kept, reason = run("gopher_repetition", repeated, top_n_grams=[])
    assert not kept and reason.startswith("gopher_dup_5_grams=")
    assert run("gopher_repetition", repeated, top_n_grams=[], dup_n_grams=[[5, 0.3]])[0]


def reference_duplicated_chars(toks: list[str], n: int) -> int:
    """Gopher's scan as its reference writes it: every position, jumping n after a repeat."""
    seen, total, i = set(), 0, 0
    while i < len(toks) - n + 1:
        gram = tuple(toks[i : i + n])
        if gram in seen:
            total += sum(map(len, gram))
            i += n
        else:
            seen.add(gram)
            i += 1
    return total


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "bb", "c", "ddd"]), max_size=60), st.integers(1, 6))
def test_duplicated_n_gram_scan_matches_the_reference(toks, n):
    grams = n_grams(toks, n)
    assert duplicated_n_gram_chars(grams, Counter(grams), n) == reference_duplicated_chars(toks, n)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["a", "bb", "c", "ddd"]), min_size=1, max_size=40), st.integers(1, 4))
def test_top_n_gram_is_the_earliest_most_frequent(toks, n):
    grams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
    if not grams:
        assert top_n_gram_chars(toks, n, 1) == 0
        return
    best = max(grams.count(g) for g in grams)
    first = next(g for g in grams if grams.count(g) == best)
    assert top_n_gram_chars(toks, n, 1) == (sum(map(len, first)) + n - 1) * best


# ---------------------------------------------------------------- tokens


def test_tokens_split_like_treebank():
    assert textstats.tokens("It's 3.14, e.g. os.path! Don't (x=1) -- wait... 'q'") == (
        "It", "'s", "3.14", ",", "e.g", ".", "os.path", "!", "Do", "n't", "(", "x=1", ")", "--",
        "wait", "...", "'", "q", "'",
    )
    assert textstats.tokens("语言模型的预训练。") == ("语言", "模型", "的", "预", "训练", "。")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab1_ .,'-=*\n\"(语言é`:"), max_size=80))
def test_tokens_cover_every_non_space_character_in_order(text):
    assert "".join(textstats.tokens(text)) == "".join(text.split())


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab1²_ .,'-=*\n\"(é`"), max_size=80))
def test_english_counts_match_a_per_token_count(text):
    toks = textstats.tokens(text)
    words = [t for t in toks if re.search(r"[^\W_]", t)]
    alpha = [w for w in words if any(c.isalpha() for c in w)]
    n_words, mean, n_tokens, n_alpha = _english_counts(toks)
    assert (n_words, n_tokens, n_alpha) == (len(words), len(toks), len(alpha))
    assert mean == pytest.approx(sum(map(len, words)) / len(words) if words else 0.0)


def test_jieba_loads_lazily_and_quietly():
    code = (
        "import sys; import lmforge.data.filters; assert 'jieba' not in sys.modules; "
        "from lmforge.data import textstats; print(textstats.segment('我们在学习语言模型'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stderr == "" and "模型" in out.stdout


# ---------------------------------------------------------------- c4, rule by rule

EN_LINE = "This line is a complete sentence with enough words."


def test_c4_keeps_only_terminated_lines_and_rewrites():
    text = "\n".join(["Header without a stop", *[EN_LINE] * 5, "Ends in an ellipsis..."])
    out, reason = FILTERS.build("c4").process(Document(id="d", text=text, source="web"))
    assert reason == "" and out.text == "\n".join([EN_LINE] * 5)
    clean = "\n".join([EN_LINE] * 5)
    doc = Document(id="d", text=clean, source="web")
    assert FILTERS.build("c4").process(doc) == (doc, "")  # nothing removed: the same document back


def test_c4_min_sentences_boundary_and_reason():
    assert run("c4", "\n".join([EN_LINE] * 5))[0]
    assert run("c4", "\n".join([EN_LINE] * 4)) == (False, "c4_sentences=4<5")
    assert run("c4", "One. Two is here. Three is here. Four is here. Five is here.")[0]
    assert run("c4", "\n".join([EN_LINE] * 4), min_sentences=4)[0]


@pytest.mark.parametrize(
    "bad_line",
    [
        "Too short.",
        "Please enable JavaScript to view the comments.",
        "We use cookies to make this site better.",
        "By using this site you agree to the terms of use.",
        "本站使用cookie提升体验。",
        "请阅读我们的隐私政策。",
        "这一句以省略号结尾……",
        "没有标点的中文行",
        "好的。",
    ],
)
def test_c4_removes_bad_lines(bad_line):
    text = "\n".join([EN_LINE] * 5 + [bad_line])
    out, _ = FILTERS.build("c4").process(Document(id="d", text=text, source="web"))
    assert out is not None and bad_line not in out.text


@pytest.mark.parametrize("ending", ["。", "！", "？", "；", "”", "」"])
def test_c4_chinese_line_ends(ending):
    line = "今天的会议讨论了明年的交通预算安排" + ending
    assert run("c4", "\n".join([line] * 5))[0]
    assert run("c4", "\n".join([line] * 4))[1] == "c4_sentences=4<5"


def test_c4_counts_chinese_sentences_inside_a_line():
    assert run("c4", "第一句话说完了。第二句话也说完了！第三句呢？第四句；第五句说完了。")[0]


def test_c4_page_rules_and_citations():
    five = "\n".join([EN_LINE] * 5)
    assert run("c4", five + "\nA line with a {curly} bracket in it.") == (False, "c4_curly_bracket")
    assert run("c4", five + "\nA line with a {curly} bracket in it.", filter_curly_bracket=False)[0]
    out, _ = FILTERS.build("c4").process(Document(id="d", text=five + "\nCited claim here[1] and more[edit].",
                                                  source="web"))
    assert out.text.endswith("Cited claim here and more.")
    zh = "\n".join(["这是一个百科条目的句子，后面有引用[编辑]。"] * 5)
    assert "[编辑]" not in FILTERS.build("c4").process(Document(id="d", text=zh, source="web"))[0].text


def test_c4_word_limits():
    five = "\n".join([EN_LINE] * 5)
    long_word = "x" * 1001
    out, _ = FILTERS.build("c4").process(Document(id="d", text=f"{five}\nA {long_word} word here.", source="web"))
    assert long_word not in out.text
    assert run("c4", "\n".join(["Two words."] * 5), min_words_per_line=2)[0]
    assert not run("c4", "\n".join(["Two words."] * 5))[0]


# ---------------------------------------------------------------- fineweb, rule by rule


def test_fineweb_punctuated_line_share():
    prose = "A line that is long enough to not count as a short line at all"
    lines = [prose + "."] * 12 + [prose + " ok"] * 88
    # Distinct endings so the duplicate-line rule stays out of the way.
    text = "\n".join(f"{line} {i}" if not line.endswith(".") else f"{i} {line}" for i, line in enumerate(lines))
    assert run("fineweb", text, max_dup_line_char_ratio=1)[0]  # 12%
    fewer = "\n".join(text.splitlines()[1:])  # 11/99
    kept, reason = run("fineweb", fewer, max_dup_line_char_ratio=1)
    assert not kept and reason == "fineweb_punct_lines=0.11<0.12"


def test_fineweb_chinese_line_ends_count():
    body = [f"第{i}段讲的是一件事情，内容足够长，不会被当作短行来计算的一整行" for i in range(20)]
    ends = [f"第{i}句话到这里结束了，后面还有引号里的话和别的内容。”" for i in range(3)]
    assert run("fineweb", "\n".join(body + ends))[0]  # 3/23 = 0.13
    kept, reason = run("fineweb", "\n".join(body + ends[:2]))
    assert not kept and reason.startswith("fineweb_punct_lines")


def test_fineweb_short_lines():
    long = [f"This is sentence {i} and it is long enough to pass easily." for i in range(33)]
    short = [f"Short {i}." for i in range(67)]
    assert run("fineweb", "\n".join(long + short))[0]  # 67%
    kept, reason = run("fineweb", "\n".join(long[:32] + short))
    assert not kept and reason == "fineweb_short_lines=0.68>0.67"
    zh_short = [f"第{i}条很短。" for i in range(70)]
    assert run("fineweb", "\n".join(long[:30] + zh_short))[1].startswith("fineweb_short_lines")


def test_fineweb_duplicate_line_characters_default_and_reference_value():
    lines = [f"Sentence {i:02d} of the page is here and is quite long too." for i in range(20)]
    one_dup = "\n".join(lines + lines[:1])  # ~5% of characters duplicated
    assert run("fineweb", one_dup)[0]  # 0.1, the write-up's threshold
    kept, reason = run("fineweb", one_dup, max_dup_line_char_ratio=0.01)  # datatrove's code default
    assert not kept and reason.startswith("fineweb_dup_line_chars=0.04")
    assert not run("fineweb", "\n".join(lines + lines[:3]))[0]


def test_fineweb_newlines_per_word():
    lines = [f"Item {i} is fine." for i in range(40)]  # 4 words + '.' = 5 tokens per newline
    assert run("fineweb", "\n".join(lines), max_short_line_ratio=1)[0]  # 39/200
    kept, reason = run("fineweb", "\n".join(lines), max_short_line_ratio=1, max_newline_word_ratio=0.19)
    assert not kept and reason.startswith("fineweb_newlines_per_word=0.20")
    zh = "\n".join(f"第{i}。" for i in range(40))  # 3 units a line: 第, the number, 。
    assert run("fineweb", zh, max_short_line_ratio=1)[1].startswith("fineweb_newlines_per_word")


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ({"name": "gopher_quality", "min_words": "fifty"}, "min_words"),
        ({"name": "gopher_quality", "stop_words": "the"}, "stop_words"),
        ({"name": "gopher_repetition", "top_n_grams": [[2]]}, "top_n_grams"),
        ({"name": "gopher_repetition", "dup_line_frac": -1}, "dup_line_frac"),
        ({"name": "c4", "filter_policy": "yes"}, "filter_policy"),
        ({"name": "c4", "min_sentences": -2}, "min_sentences"),
        ({"name": "fineweb", "short_line_length": 2.5}, "short_line_length"),
        ({"name": "fineweb", "typo_option": 1}, "typo_option"),
    ],
)
def test_bad_options_name_the_recipe_key(spec, key):
    with pytest.raises(ConfigError, match=key):
        build_filter(spec, 3)


def test_none_turns_a_gopher_bound_off():
    assert not run("gopher_quality", en_words(10))[0]
    assert run("gopher_quality", en_words(10), min_words=None)[0]
