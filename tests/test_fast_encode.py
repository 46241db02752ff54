"""The tiktoken fast path gives exactly the ids `tokenizers` gives, or refuses by name."""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import numpy as np
import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from lmforge.config import BuiltinCorpusConfig, TokenizerConfig
from lmforge.data.builtin import iter_builtin_corpus
from lmforge.tokenizer import fast_encode as fe
from lmforge.tokenizer.special_tokens import SENTINEL_TOKENS, SPECIAL_TOKENS
from lmforge.tokenizer.train import train_tokenizer

# GPT-4's split (cl100k_base), the form a Split(Regex, isolated) + ByteLevel(use_regex=False) takes.
CL100K = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
HANZI = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可里后"
EMOJI = ["🤗", "🚀", "👩🏽‍💻", "👨‍👩‍👧‍👦", "🇨🇳", "❤️", "😀"]

FRAGMENTS = [
    "The quick brown fox", " jumps", " I'll", "'s", "DON'T", "we'VE", " O'Neil", "Straße", "ß's", "'ſ", "K",
    "大规模语言模型的预训练", "。", "、", "日本語", "한국어", *EMOJI, "e\u0301", "a\u0308\u0304", "\u200d", "\u200c",
    "\u200f", "مرحبا", "עברית", "हिन्दी", "\x00", "\x1b[0m", "\x7f", "\ufeff", "\t", "\r\n", "\n\n\n", "   ", "  \t ",
    "\u00a0", "\u3000", "\x85", "\u2028", "0123456789", "3.14159", "1,000", "½²", "def f(x):\n    return x * 2\n",
    "{'a': [1, 2]}", "    ", "<|endoftext|>", "<|pad|>", "<extra_id_0>", "<extra_id_99>", "<|endoftext", "|>",
]
piece = st.one_of(
    st.sampled_from(FRAGMENTS),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=8),  # lone surrogates are not valid UTF-8
    st.text(alphabet=" \t\n\r\x0b\x0c", min_size=1, max_size=6),
    st.text(alphabet="0123456789", min_size=1, max_size=14),
    st.text(alphabet=HANZI, min_size=1, max_size=10),
)
texts = st.lists(st.lists(piece, max_size=14).map("".join), min_size=1, max_size=6)


def synthetic(n_lines: int = 400, seed: int = 0) -> list[str]:
    """Chinese, emoji and digit lines the standard library lacks, so merges cover multi-byte tokens."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        lines.append("".join(rng.choices(HANZI, k=40)) + "。" + "".join(rng.choices(EMOJI, k=3)))
        lines.append(f"{rng.randint(0, 10**9)} items at {rng.random():.4f} each\r\n")
    return lines


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    docs = iter_builtin_corpus(BuiltinCorpusConfig(max_prose_bytes=120_000, max_code_bytes=120_000))
    return [d.text for d in docs] + synthetic()


@pytest.fixture(scope="module")
def lmforge_tok(corpus, tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return train_tokenizer(corpus, TokenizerConfig(vocab_size=1024), path, progress=False)


@pytest.fixture(scope="module")
def gpt4_tok(corpus) -> Tokenizer:
    """lmforge's recipe with the GPT-4 regex, written as a Split + ByteLevel(use_regex=False) Sequence."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(CL100K), behavior="isolated"), pre_tokenizers.ByteLevel(False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024 - len(SENTINEL_TOKENS), special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens(list(SENTINEL_TOKENS))
    return tok


def reference(tok: Tokenizer, batch: list[str], specials_as_text: bool = True) -> list[list[int]]:
    """What the tokenize stage gets from tokenizers, on a copy so the fixture's flag never changes."""
    copy = Tokenizer.from_str(tok.to_str())
    copy.encode_special_tokens = specials_as_text
    return [e.ids for e in copy.encode_batch(batch, add_special_tokens=False)]


def edited(tok: Tokenizer, edit: Callable[[dict], None]) -> Tokenizer:
    spec = json.loads(tok.to_str())
    edit(spec)
    return Tokenizer.from_str(json.dumps(spec))


@pytest.fixture(scope="module")
def encoders(lmforge_tok, gpt4_tok) -> dict[tuple[str, bool], fe.FastEncoder]:
    return {
        (name, as_text): fe.FastEncoder(tok, threads=2, specials_as_text=as_text)
        for name, tok in (("lmforge", lmforge_tok), ("gpt4", gpt4_tok))
        for as_text in (True, False)
    }


# ---------------------------------------------------------------- identical ids


def test_lmforge_ranks_are_our_ids(lmforge_tok):
    """Trained vocabularies number merges in merge order, so tiktoken's values need no lookup."""
    path = fe.build_tiktoken_path(lmforge_tok)
    assert path.to_ours is None
    enc = fe.tiktoken_encoding(lmforge_tok)
    assert isinstance(enc, tiktoken.Encoding)
    text = "Hello world, 你好 🤗"
    assert enc.encode_ordinary(text) == lmforge_tok.encode(text).ids
    assert enc.decode(enc.encode_ordinary(text)) == text


@pytest.mark.parametrize("name", ["lmforge", "gpt4"])
@pytest.mark.parametrize("as_text", [True, False])
def test_whole_corpus_identical(encoders, lmforge_tok, gpt4_tok, corpus, name, as_text):
    encoder = encoders[(name, as_text)]
    assert encoder.backend == "tiktoken", encoder.reason
    tok = lmforge_tok if name == "lmforge" else gpt4_tok
    want = reference(tok, corpus, as_text)
    assert encoder.encode_batch(corpus) == want
    arrays = encoder.encode_arrays(corpus)
    assert all(a.dtype == np.uint32 for a in arrays) and [a.tolist() for a in arrays] == want


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=texts, as_text=st.booleans())
def test_property_lmforge_form(encoders, lmforge_tok, batch, as_text):
    want = reference(lmforge_tok, batch, as_text)
    assert encoders[("lmforge", as_text)].encode_batch(batch) == want
    assert [a.tolist() for a in encoders[("lmforge", as_text)].encode_arrays(batch)] == want


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=texts, as_text=st.booleans())
def test_property_gpt4_split_form(encoders, gpt4_tok, batch, as_text):
    assert encoders[("gpt4", as_text)].encode_batch(batch) == reference(gpt4_tok, batch, as_text)


def test_every_code_point(encoders, lmforge_tok, gpt4_tok):
    """Each assigned plane's code points, 64 at a time: the two regex engines classify all alike."""
    planes = [*range(0, 0x40000), *range(0xE0000, 0xE1000)]
    chars = [chr(c) for c in planes if not 0xD800 <= c <= 0xDFFF]
    batch = [" ".join(chars[i : i + 64]) + "".join(chars[i : i + 64]) for i in range(0, len(chars), 64)]
    for name, tok in (("lmforge", lmforge_tok), ("gpt4", gpt4_tok)):
        assert encoders[(name, True)].encode_batch(batch) == reference(tok, batch), name


def test_split_regex_that_leaves_gaps(lmforge_tok, corpus):
    """A Split regex that does not match everything: HF keeps each gap as a piece, tiktoken would drop
    it, so the fast path adds a gap alternative to the pattern."""
    tok = Tokenizer.from_str(lmforge_tok.to_str())
    split_form(r"\p{L}+| ?\p{N}+")(tok)
    encoder = fe.FastEncoder(tok, threads=2)
    assert encoder.backend == "tiktoken", encoder.reason
    batch = corpus[:40] + list(fe.PROBE_TEXTS)
    assert encoder.encode_batch(batch) == reference(tok, batch)


def test_specials_in_text(encoders, lmforge_tok):
    """specials_as_text=True (the tokenize stage) never yields EOS from a quoted "<|endoftext|>";
    False matches it, as tokenizers does by default. The caller's tokenizer is left as it was."""
    text = ["a <|endoftext|> b<extra_id_0>"]
    eos, sentinel0 = lmforge_tok.token_to_id("<|endoftext|>"), lmforge_tok.token_to_id("<extra_id_0>")
    as_text = encoders[("lmforge", True)].encode_batch(text)[0]
    matched = encoders[("lmforge", False)].encode_batch(text)[0]
    assert eos not in as_text and sentinel0 not in as_text
    assert eos in matched and sentinel0 in matched
    assert matched == lmforge_tok.encode(text[0], add_special_tokens=False).ids
    assert lmforge_tok.encode_special_tokens is False


def merge_order_reversed(tok: Tokenizer) -> Tokenizer:
    """`tok` with its merged tokens' ids reversed, so ids no longer follow merge order."""
    spec = json.loads(tok.to_str())
    merged = {"".join(m) if isinstance(m, list) else m.replace(" ", "") for m in spec["model"]["merges"]}
    ids = sorted(spec["model"]["vocab"][t] for t in merged)
    for token, new_id in zip(sorted(merged, key=spec["model"]["vocab"].get), reversed(ids), strict=True):
        spec["model"]["vocab"][token] = new_id
    return Tokenizer.from_str(json.dumps(spec))


def test_ids_not_in_merge_order_use_the_lookup(lmforge_tok, corpus):
    """A vocabulary whose ids do not follow merge order still encodes right, through the table."""
    shuffled = merge_order_reversed(lmforge_tok)
    encoder = fe.FastEncoder(shuffled, threads=2)
    assert encoder.backend == "tiktoken" and fe.build_tiktoken_path(shuffled).to_ours is not None
    batch = corpus[:40] + list(fe.PROBE_TEXTS)
    assert encoder.encode_batch(batch) == reference(shuffled, batch)
    assert encoder.encode_batch(batch) != reference(lmforge_tok, batch)  # the ids really moved
    assert [a.tolist() for a in encoder.encode_arrays(batch)] == reference(shuffled, batch)


def joined_reference(encoder: fe.FastEncoder, batch: list[str], sep: int) -> tuple[list[int], list[int]]:
    ids = encoder.encode_batch(batch)
    return [t for doc in ids for t in (*doc, sep)], [len(doc) + 1 for doc in ids]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=texts, as_text=st.booleans(), name=st.sampled_from(["lmforge", "gpt4"]))
def test_property_joined_equals_one_call_per_text(encoders, lmforge_tok, batch, as_text, name):
    """One call for the batch with EOS between texts (the tokenize stage's) gives each text's own ids,
    including texts that quote "<|endoftext|>" or other specials, empty texts and odd Unicode."""
    encoder = encoders[(name, as_text)]
    eos = lmforge_tok.token_to_id("<|endoftext|>")
    tokens, lengths = encoder.encode_joined(batch, eos)
    assert tokens.dtype == np.uint32
    assert (tokens.tolist(), lengths) == joined_reference(encoder, batch, eos)


def test_joined_takes_one_call_unless_a_text_holds_the_separator(lmforge_tok, corpus, monkeypatch):
    encoder = fe.FastEncoder(lmforge_tok, threads=1)
    eos = lmforge_tok.token_to_id("<|endoftext|>")
    want = joined_reference(encoder, corpus[:50], eos)
    per_text = []
    monkeypatch.setattr(fe, "_tiktoken_arrays", lambda *a: per_text.append(1) or [])
    tokens, lengths = encoder.encode_joined(corpus[:50], eos)
    assert (tokens.tolist(), lengths) == want and not per_text  # one call, no per-text encoding
    monkeypatch.undo()
    quoting = ["a <|endoftext|> b", "c"]
    tokens, lengths = encoder.encode_joined(quoting, eos)
    assert (tokens.tolist(), lengths) == joined_reference(encoder, quoting, eos)
    assert lengths[0] == len(encoder.encode_batch(quoting[:1])[0]) + 1  # the quote stays text
    # A separator that is an ordinary token, and the `tokenizers` fallback, join after encoding.
    plain = lmforge_tok.token_to_id("a")
    hf = fe.FastEncoder(lmforge_tok, threads=1, use_tiktoken=False)
    for enc, sep in ((encoder, plain), (hf, eos)):
        tokens, lengths = enc.encode_joined(corpus[:5], sep)
        assert (tokens.tolist(), lengths) == joined_reference(encoder, corpus[:5], sep)
    assert encoder.encode_joined([], eos)[0].size == 0


def test_joined_through_the_lookup_table(lmforge_tok, corpus):
    """Ids not in merge order: the one call's values go through the same rank -> id table."""
    encoder = fe.FastEncoder(merge_order_reversed(lmforge_tok), threads=1)
    eos = lmforge_tok.token_to_id("<|endoftext|>")
    batch = corpus[:20] + list(fe.PROBE_TEXTS)
    tokens, lengths = encoder.encode_joined(batch, eos)
    assert (tokens.tolist(), lengths) == joined_reference(encoder, batch, eos)


def test_fast_encoder_and_surrogates(lmforge_tok):
    encoder = fe.FastEncoder(lmforge_tok, threads=2)
    assert encoder.name.startswith("tiktoken") and encoder(["hi there"]) == reference(lmforge_tok, ["hi there"])
    for encode in (encoder.encode_batch, encoder.encode_arrays, lambda t: encoder.encode_joined(t, 0)):
        with pytest.raises(ValueError, match="surrogate"):  # tiktoken would silently write U+FFFD
            encode(["ok", "bad \ud800 text"])


# ---------------------------------------------------------------- refusals


def toy_bpe(merges: list[tuple[str, str]]) -> Tokenizer:
    """All 256 byte symbols plus the tokens `merges` create, ids in merge order."""
    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tok


def test_tokenizer_without_added_tokens():
    tok = toy_bpe([("a", "b"), ("ab", "c"), ("Ġ", "ab")])
    encoder = fe.FastEncoder(tok, threads=2)
    batch = ["abc abcab", "xabcx", *fe.PROBE_TEXTS]
    assert encoder.backend == "tiktoken", encoder.reason
    assert encoder.encode_batch(batch) == [a.tolist() for a in encoder.encode_arrays(batch)] == reference(tok, batch)


def test_inconsistent_merge_order_refused():
    """(a, bc) can never fire after (a, b): HF leaves "abc" as [ab, c], tiktoken would join it."""
    tok = toy_bpe([("a", "b"), ("b", "c"), ("a", "bc")])
    with pytest.raises(fe.FastPathUnavailable, match="merge 2"):
        fe.tiktoken_encoding(tok)
    naive = tiktoken.Encoding(
        "naive", pat_str=fe.GPT2_PATTERN, special_tokens={},
        mergeable_ranks={**{bytes([b]): b for b in range(256)}, b"ab": 256, b"bc": 257, b"abc": 258},
    )
    assert len(tok.encode("abc").ids) == 2 and len(naive.encode_ordinary("abc")) == 1  # the check is needed


def test_duplicate_merge_refused():
    with pytest.raises(fe.FastPathUnavailable, match="two merge priorities"):
        fe.tiktoken_encoding(toy_bpe([("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]))


def split_form(pattern: str) -> Callable[[Tokenizer], None]:
    def apply(tok: Tokenizer) -> None:
        split = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(False, use_regex=False)])

    return apply


def set_model(key: str, value: object) -> Callable[[dict], None]:
    return lambda spec: spec["model"].__setitem__(key, value)


def set_pre(make: Callable[[], pre_tokenizers.PreTokenizer]) -> Callable[[Tokenizer], None]:
    return lambda tok: setattr(tok, "pre_tokenizer", make())


def two_regexes() -> pre_tokenizers.PreTokenizer:
    steps = [pre_tokenizers.Split(Regex(CL100K), "isolated"), pre_tokenizers.ByteLevel(False, use_regex=True)]
    return pre_tokenizers.Sequence(steps)


REFUSALS = {
    "normalizer": (lambda t: setattr(t, "normalizer", normalizers.NFC()), "normalizer"),
    "prefix space": (set_pre(lambda: pre_tokenizers.ByteLevel(add_prefix_space=True)), "add_prefix_space"),
    "whitespace": (set_pre(pre_tokenizers.Whitespace), "pre-tokenizer"),
    "two regexes": (set_pre(two_regexes), "use_regex"),
    "line anchor": (split_form(r"^\p{L}+|\s+|[^\s\p{L}]+"), "line anchor"),
    "multi-char fold": (split_form(r"(?i:ss|st)|\p{L}+|\s+|[^\s\p{L}]+"), "ß"),
    r"\w": (split_form(r"\w+|\s+|[^\s\w]+"), r"\\w"),
    "fancy-regex cannot compile": (split_form(r"a**|\s+|[^\s]+"), "cannot compile"),
    "empty match": (split_form(r"\p{L}*"), "empty"),
    "non-special added": (lambda t: t.add_tokens(["hello"]), "non-special"),
    "wordpiece": (lambda t: setattr(t, "model", models.WordPiece({"a": 0, "[UNK]": 1}, unk_token="[UNK]")), "not BPE"),
}
JSON_REFUSALS = {
    "dropout": (set_model("dropout", 0.1), "dropout"),
    "unk": (set_model("unk_token", "<|pad|>"), "unk_token"),
    "byte_fallback": (set_model("byte_fallback", True), "byte_fallback"),
    "suffix": (set_model("end_of_word_suffix", "</w>"), "end_of_word_suffix"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS) + sorted(JSON_REFUSALS))
def test_refused_by_name_and_falls_back(lmforge_tok, case):
    if case in REFUSALS:
        tok = Tokenizer.from_str(lmforge_tok.to_str())
        edit, message = REFUSALS[case]
        edit(tok)
    else:
        edit, message = JSON_REFUSALS[case]
        tok = edited(lmforge_tok, edit)
    with pytest.raises(fe.FastPathUnavailable, match=message):
        fe.tiktoken_encoding(tok)
    encoder = fe.FastEncoder(tok, threads=2)
    assert encoder.backend == "tokenizers" and message.strip("\\") in encoder.reason
    batch = ["Hello, world!  x <|endoftext|>", "你好 🤗"]
    if case != "dropout":  # dropout makes tokenizers itself random
        assert encoder.encode_batch(batch) == reference(tok, batch)
        assert [a.tolist() for a in encoder.encode_arrays(batch)] == reference(tok, batch)


def test_matching_rules_refused_only_when_specials_are_matched(lmforge_tok):
    """lstrip and a special that is a prefix of another change how text is matched, not read as text."""
    for token, message in ((AddedToken("<x>", special=True, lstrip=True), "lstrip"), ("<|pad|>x", "prefix")):
        tok = Tokenizer.from_str(lmforge_tok.to_str())
        tok.add_special_tokens([token])
        assert fe.FastEncoder(tok, specials_as_text=True).backend == "tiktoken"
        with pytest.raises(fe.FastPathUnavailable, match=message):
            fe.tiktoken_encoding(tok, specials_as_text=False)


def test_without_tiktoken_falls_back(lmforge_tok, monkeypatch):
    monkeypatch.setattr(fe, "tiktoken", None)
    encoder = fe.FastEncoder(lmforge_tok)
    assert encoder.backend == "tokenizers" and "not installed" in encoder.reason
    assert encoder.encode_batch(["a b"]) == reference(lmforge_tok, ["a b"])
