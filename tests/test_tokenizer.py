"""Byte-level BPE training: exact round trips, fixed special-token ids, HF compatibility."""

from __future__ import annotations

import hashlib
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from lmforge.config import TokenizerConfig
from lmforge.tokenizer import special_tokens as sp
from lmforge.tokenizer.train import _take_bytes, load_tokenizer, tokenizer_hash, train_tokenizer

SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "大规模语言模型的预训练需要高质量的数据。数据清洗包括去重、过滤和隐私信息处理！",
    "emoji: 🤗🚀 👩🏽‍💻 family 👨‍👩‍👧‍👦 flags 🇨🇳🇬🇧 ❤️",
    "def f(x):\n\tif x  >= 10:\n\t\treturn {'a': [1, 2]}  # trailing  \n\n\r\n",
    "   leading spaces, trailing spaces   ",
    "never seen: Ελληνικά العربية हिन्दी 한국어 \x00\x01\x7f \u200b \ufeff",
    "a literal <|endoftext|> and <|pad|> inside text",
    "",
]


def corpus(n_bytes: int = 200_000, seed: int = 0) -> list[str]:
    """Prose from made-up words with a Zipf-like law, Chinese lines and code: enough pairs for 500 merges."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(2000)]
    weights = [1 / (i + 1) for i in range(len(words))]
    hanzi = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可里后"
    texts, size = [], 0
    while size < n_bytes:
        kind = rng.random()
        if kind < 0.6:
            text = " ".join(rng.choices(words, weights, k=60)).capitalize() + "."
        elif kind < 0.8:
            text = "".join(rng.choices(hanzi, k=80)) + "。"
        else:
            name = rng.choice(words)
            text = f"def {name}(x, y=1):\n    return x * {rng.randint(0, 99)} + y  # {rng.choice(words)}\n"
        texts.append(text)
        size += len(text.encode("utf-8"))
    return texts


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return train_tokenizer(corpus(), TokenizerConfig(vocab_size=500), path, progress=False), path


def decode(tokenizer: Tokenizer, text: str) -> str:
    return tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_exact(trained, text):
    tokenizer, _ = trained
    assert decode(tokenizer, text) == text


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=200))
def test_round_trip_any_unicode(trained, text):
    assert decode(trained[0], text) == text


def test_special_token_ids_fixed(trained, tmp_path):
    small = train_tokenizer(corpus(50_000, seed=1), TokenizerConfig(vocab_size=400), tmp_path / "t.json", False)
    for tokenizer in (trained[0], small):
        for expected, token in enumerate(sp.SPECIAL_TOKENS):
            assert tokenizer.token_to_id(token) == expected
    assert (sp.EOS_ID, sp.PAD_ID, sp.MASK_ID, sp.FIM_PAD_ID, sp.S2S_ID) == (0, 1, 3, 9, 12)
    assert sp.SPECIAL_TOKENS[sp.FIM_MIDDLE_ID] == sp.FIM_MIDDLE and sp.SPECIAL_TOKENS[sp.NLG_ID] == sp.NLG
    assert len(sp.SPECIAL_TOKENS) == len(set(sp.SPECIAL_TOKENS)) == 13
    # Special tokens in the input are single ids; the byte alphabet follows them.
    assert trained[0].encode(sp.EOS + sp.FIM_PREFIX).ids == [sp.EOS_ID, sp.FIM_PREFIX_ID]


def test_vocab_size_respected(trained, tmp_path):
    assert trained[0].get_vocab_size() == 500
    tokenizer = train_tokenizer(corpus(), TokenizerConfig(vocab_size=420), tmp_path / "t.json", progress=False)
    assert tokenizer.get_vocab_size() == 420


def test_role_map_saved_with_t5_sentinels_at_the_top(trained):
    tokenizer, path = trained
    special = sp.load_special_tokens(path, tokenizer)
    assert sp.special_tokens_path(path).is_file()
    assert (special.eos, special.pad, special.mask, special.fim_pad, special.s2s) == (0, 1, 3, 9, 12)
    assert len(special.sentinels) == sp.N_SENTINELS
    assert special.sentinels[0] == tokenizer.token_to_id("<extra_id_0>") == tokenizer.get_vocab_size() - 1
    assert special.sentinels[99] == tokenizer.get_vocab_size() - 100
    assert list(special.sentinels) == sorted(special.sentinels, reverse=True)
    assert tokenizer.encode("a<extra_id_7>b").ids[1] == special.sentinels[7]
    assert sp.SpecialTokens.from_json(special.to_json()) == special


def test_no_prefix_space_added(trained):
    # "Ġ" is the byte-level symbol of a space: it must come only from the text itself.
    assert not trained[0].encode("hello").tokens[0].startswith("Ġ")
    assert trained[0].encode(" hello").tokens[0].startswith("Ġ")


def test_all_bytes_in_alphabet_even_when_unseen(tmp_path):
    tokenizer = train_tokenizer(["ab ab ab"] * 50, TokenizerConfig(vocab_size=400), tmp_path / "t.json", False)
    assert tokenizer.get_vocab_size() >= len(sp.SPECIAL_TOKENS) + 256 + sp.N_SENTINELS
    text = "\x00 Ω 😀"
    assert decode(tokenizer, text) == text
    assert None not in tokenizer.encode(text).ids


def test_max_train_bytes_stops_feeding(tmp_path):
    head = ["alpha beta gamma delta"] * 500
    tail = ["zyxwvut qqqqqq"] * 500
    budget = sum(len(t) for t in head)
    tokenizer = train_tokenizer(
        head + tail, TokenizerConfig(vocab_size=400, max_train_bytes=budget), tmp_path / "t.json", False
    )
    vocab = tokenizer.get_vocab()
    assert "alpha" in vocab or "Ġalpha" in vocab
    assert not any("zy" in token or "qq" in token for token in vocab)


def test_take_bytes_cuts_on_a_character_boundary():
    assert list(_take_bytes(["ab", "cd", "ef"], 4)) == ["ab", "cd"]
    assert list(_take_bytes(["ab", "中文"], 6)) == ["ab", "中"]  # 2 + 3 bytes; half of 文 is dropped
    assert list(_take_bytes(["ab"], 0)) == []


def test_training_is_deterministic(trained, tmp_path):
    train_tokenizer(corpus(), TokenizerConfig(vocab_size=500), tmp_path / "again.json", progress=False)
    assert tokenizer_hash(tmp_path / "again.json") == tokenizer_hash(trained[1])


def test_saved_file_loads_in_transformers(trained):
    tokenizer, path = trained
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    assert len(hf) == tokenizer.get_vocab_size()
    for text in SAMPLES:
        ids = tokenizer.encode(text).ids
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids) == text
    assert hf.convert_tokens_to_ids(sp.MASK) == sp.MASK_ID


def test_load_and_hash(trained, tmp_path):
    tokenizer, path = trained
    loaded = load_tokenizer(path)
    for text in SAMPLES:
        assert loaded.encode(text).ids == tokenizer.encode(text).ids
    assert tokenizer_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    edited = tmp_path / "edited.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["model"]["merges"] = data["model"]["merges"][:-1]
    edited.write_text(json.dumps(data), encoding="utf-8")
    assert tokenizer_hash(edited) != tokenizer_hash(path)


def test_foreign_vocabulary_roles_are_inferred(tmp_path):
    foreign = Tokenizer(models.BPE())
    foreign.add_special_tokens(["<unk>", "<s>", "</s>", "<extra_id_0>", "<extra_id_1>"])  # Llama / T5 spellings
    foreign.save(str(tmp_path / "foreign.json"))
    special = sp.load_special_tokens(tmp_path / "foreign.json")
    assert (special.eos, special.bos, special.mask, special.sentinels) == (2, 1, None, (3, 4))
    with pytest.raises(sp.MissingRoleError, match="mlm needs a 'mask' special token"):
        special.require("mask", "mlm")
    no_eos = Tokenizer(models.BPE())
    no_eos.add_special_tokens(["<s>"])
    no_eos.save(str(tmp_path / "no_eos.json"))
    with pytest.raises(sp.MissingRoleError, match=r"no_eos\.json: no end-of-document token"):
        sp.load_special_tokens(tmp_path / "no_eos.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokenizer(tmp_path / "missing.json")


def test_spread_sample_covers_the_whole_corpus_deterministically():
    from lmforge.data.document import Document
    from lmforge.tokenizer.train import spread_sample

    docs = [Document(id=f"d{i}", text=f"text {i}", source="a" if i < 500 else "b") for i in range(1000)]
    picked = list(spread_sample(docs, 0.3, seed=7))
    assert picked == list(spread_sample(docs, 0.3, seed=7))
    assert picked != list(spread_sample(docs, 0.3, seed=8))
    assert 240 <= len(picked) <= 360
    numbers = [int(t.split()[1]) for t in picked]
    assert min(numbers) < 100 and max(numbers) >= 900  # head and tail of the stream both sampled
    assert len(list(spread_sample(docs, 1.0, seed=7))) == 1000
