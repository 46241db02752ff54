"""Tokenizer kinds and options, `tokenizer.from`, and the per-source bytes/token report."""

from __future__ import annotations

import itertools
import json
import random
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tokenizer import SAMPLES, corpus
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lmforge.config import ConfigError, TokenizerConfig
from lmforge.recipe import load_config
from lmforge.tokenizer import special_tokens as sp
from lmforge.tokenizer.train import (
    GPT2_PATTERN,
    GPT4_PATTERN,
    WORDPIECE_PREFIX,
    build_pre_tokenizer,
    import_tokenizer,
    pretokenizer_pattern,
    train_tokenizer,
)

regex = pytest.importorskip("regex")

ENGLISH = ["The model reads 12,345 tokens and writes 3.14159 logits; I'M sure it's fine.", "  x = y  # don't\n\n"]
CHINESE = ["大规模语言模型的预训练需要高质量的数据。", "使用Python训练模型，共有2024个样本〇。"]
TRICKY = ENGLISH + CHINESE + SAMPLES + ["ⅫⅡ² ½ 12 345 6789", "\r\n\r\n  \t中 文 ab中cd", "日本語とEnglish混合テキスト"]
OPTIONS = list(itertools.product(["gpt2", "gpt4"], [False, True], ["none", "chars"]))


def _byte_symbols() -> dict[int, str]:
    """GPT-2's byte -> printable symbol table, written out so the test does not trust tokenizers' own."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


BYTE_SYMBOL = _byte_symbols()


def reference_split(pattern: str, text: str) -> list[str]:
    """What tiktoken does with `pattern`: regex pieces, each as byte symbols."""
    return ["".join(BYTE_SYMBOL[b] for b in piece.encode("utf-8")) for piece in regex.findall(pattern, text)]


def hf_split(cfg: TokenizerConfig, text: str) -> list[str]:
    return [piece for piece, _ in build_pre_tokenizer(cfg).pre_tokenize_str(text)]


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = "ab AB'sSmLld 0123456789 \n\r\t中文字〇。，,.!?😀é\u00a0\u3000Ⅻ²_-#"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n)]


# ---------------------------------------------------------------- pre-tokenization


def test_default_stays_bytelevel_regex_and_options_give_one_split_regex():
    assert pretokenizer_pattern(TokenizerConfig()) is None
    assert json.loads(build_pre_tokenizer(TokenizerConfig()).__getstate__()) == {
        "type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True,
    }
    assert pretokenizer_pattern(TokenizerConfig(pre_tokenizer="gpt4")) == GPT4_PATTERN
    state = json.loads(build_pre_tokenizer(TokenizerConfig(pre_tokenizer="gpt2", split_digits=True)).__getstate__())
    # The layout a tiktoken fast path relies on: exactly one regex Split, then ByteLevel without its regex.
    assert [p["type"] for p in state["pretokenizers"]] == ["Split", "ByteLevel"]
    assert state["pretokenizers"][0]["behavior"] == "Isolated"
    assert state["pretokenizers"][1]["use_regex"] is False


def test_default_bpe_file_is_byte_for_byte_the_one_before_kinds(tmp_path):
    """The default config must give the very file the BPE-only trainer wrote, so runs keep their hashes."""
    texts = corpus(40_000)
    train_tokenizer(texts, TokenizerConfig(vocab_size=450), tmp_path / "t.json", progress=False)
    old = Tokenizer(models.BPE())
    old.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    old.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=350, min_frequency=2, show_progress=False,
                                  special_tokens=list(sp.SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    old.train_from_iterator(texts, trainer=trainer)
    old.add_special_tokens(list(sp.SENTINEL_TOKENS))
    assert (tmp_path / "t.json").read_text(encoding="utf-8") == old.to_str(pretty=True)


def test_default_split_is_the_gpt2_pattern():
    for text in TRICKY + random_texts(300):
        assert hf_split(TokenizerConfig(), text) == reference_split(GPT2_PATTERN, text)


@pytest.mark.parametrize(("pre", "digits", "cjk"), OPTIONS)
def test_hf_split_equals_the_pattern_everywhere(pre, digits, cjk):
    """tokenizers (onig) and the `regex` module (tiktoken's semantics) split alike with every option."""
    cfg = TokenizerConfig(pre_tokenizer=pre, split_digits=digits, cjk=cjk)
    pattern = pretokenizer_pattern(cfg) or GPT2_PATTERN
    for text in TRICKY + random_texts(300, seed=OPTIONS.index((pre, digits, cjk))):
        assert hf_split(cfg, text) == reference_split(pattern, text), text


def test_gpt4_pattern_semantics():
    split = [p for p in regex.findall(GPT4_PATTERN, "I'M 1234567 hello\n\nworld")]
    assert split == ["I", "'M", " ", "123", "456", "7", " hello", "\n\n", "world"]
    assert regex.findall(GPT2_PATTERN, "I'M 1234567") == ["I", "'", "M", " 1234567"]


@pytest.mark.parametrize("pre", ["gpt2", "gpt4"])
def test_split_digits_and_cjk_chars(pre):
    digits = pretokenizer_pattern(TokenizerConfig(pre_tokenizer=pre, split_digits=True))
    assert [p.strip() for p in regex.findall(digits, "x 2024 y") if p.strip()] == ["x", "2", "0", "2", "4", "y"]
    chars = pretokenizer_pattern(TokenizerConfig(pre_tokenizer=pre, cjk="chars"))
    pieces = regex.findall(chars, "使用Python训练模型〇 中文ab")
    assert [p for p in pieces if regex.search(r"\p{Han}", p)] == list("使用训练模型〇中文")  # each alone
    assert "Python" in pieces and "ab" in pieces
    plain = pretokenizer_pattern(TokenizerConfig(pre_tokenizer=pre, split_digits=True))
    assert "使用Python训练模型" in regex.findall(plain, "使用Python训练模型")  # cjk=none: one letter run


# ---------------------------------------------------------------- kinds


KINDS = [
    TokenizerConfig(kind="bpe", vocab_size=700, pre_tokenizer="gpt4", split_digits=True, cjk="chars"),
    TokenizerConfig(kind="unigram", vocab_size=700),
    TokenizerConfig(kind="unigram", vocab_size=700, pre_tokenizer="gpt4", split_digits=True, normalizer="nfc"),
    TokenizerConfig(kind="wordpiece", vocab_size=900),
    TokenizerConfig(kind="wordpiece", vocab_size=900, pre_tokenizer="gpt4", split_digits=True, cjk="chars"),
]


@pytest.fixture(scope="module", params=KINDS, ids=lambda c: f"{c.kind}-{c.pre_tokenizer}-{c.cjk}")
def trained(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return train_tokenizer(corpus(80_000), request.param, path, progress=False), path, request.param


def test_roles_at_the_bottom_sentinels_at_the_top(trained):
    tokenizer, path, cfg = trained
    for expected, token in enumerate(sp.SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == expected
    special = sp.load_special_tokens(path, tokenizer)
    size = tokenizer.get_vocab_size()
    assert special.sentinels[0] == tokenizer.token_to_id("<extra_id_0>") == size - 1
    assert special.sentinels[99] == size - 100
    assert size <= cfg.vocab_size
    if cfg.kind != "unigram":  # Unigram may stop short of the target on a small corpus
        assert size == cfg.vocab_size
    assert tokenizer.encode(sp.EOS + "a" + sp.sentinel(3)).ids[::2] == [sp.EOS_ID, special.sentinels[3]]


def normalized(text: str, cfg: TokenizerConfig) -> str:
    """What decoding gives back: the text itself, or its normal form under a normalizer."""
    return text if cfg.normalizer == "none" else unicodedata.normalize(cfg.normalizer.upper(), text)


def test_round_trip_and_transformers_parity(trained):
    tokenizer, path, cfg = trained
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    assert len(hf) == tokenizer.get_vocab_size()
    for text in ENGLISH + CHINESE + SAMPLES + ["x" * 500, "中" * 300, "丽 ﬁ"]:
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == normalized(text, cfg)
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids) == normalized(text, cfg)
    chinese = tokenizer.encode(CHINESE[0]).ids
    assert len(chinese) < len(CHINESE[0].encode("utf-8"))  # learned multi-byte tokens, not just bytes


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=120))
def test_any_unicode_round_trips(trained, text):
    tokenizer, _, cfg = trained
    assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == normalized(text, cfg)


def test_wordpiece_has_every_continuation_and_never_unk(tmp_path):
    cfg = TokenizerConfig(kind="wordpiece", vocab_size=700)
    tokenizer = train_tokenizer(corpus(30_000), cfg, tmp_path / "t.json", progress=False)
    vocab = tokenizer.get_vocab()
    assert tokenizer.get_vocab_size() == 700
    assert all(WORDPIECE_PREFIX + c in vocab and c in vocab for c in pre_tokenizers.ByteLevel.alphabet())
    long_word = "Ω" * 90 + "q" * 150  # 330 byte symbols, over WordPiece's 100 per word
    ids = tokenizer.encode(long_word).ids
    assert "[UNK]" not in vocab and tokenizer.decode(ids) == long_word


def test_normalizers(tmp_path):
    texts = corpus(20_000)
    nfkc = train_tokenizer(texts, TokenizerConfig(vocab_size=500, normalizer="nfkc"), tmp_path / "k.json", False)
    assert nfkc.encode("ﬁne ＡＢ").ids == nfkc.encode("fine AB").ids
    nfc = train_tokenizer(texts, TokenizerConfig(vocab_size=500, normalizer="nfc"), tmp_path / "c.json", False)
    assert nfc.encode("cafe\u0301").ids == nfc.encode("caf\u00e9").ids
    plain = train_tokenizer(texts, TokenizerConfig(vocab_size=500), tmp_path / "p.json", False)
    assert plain.encode("cafe\u0301").ids != plain.encode("caf\u00e9").ids
    assert json.loads((tmp_path / "p.json").read_text())["normalizer"] is None


# ---------------------------------------------------------------- config


def test_recipe_keys_and_bad_combinations(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("tokenizer:\n  from: some/dir\n  kind: wordpiece\n  pre_tokenizer: gpt4\n  cjk: chars\n")
    cfg = load_config(recipe, ["tokenizer.split_digits=true", "tokenizer.normalizer=nfkc"])
    tok = cfg.tokenizer
    assert (tok.from_, tok.kind, tok.pre_tokenizer, tok.cjk, tok.split_digits, tok.normalizer) == (
        "some/dir", "wordpiece", "gpt4", "chars", True, "nfkc")
    assert load_config(None, ["tokenizer.from=x/tokenizer.json"]).tokenizer.from_ == "x/tokenizer.json"
    assert load_config().tokenizer.from_ == ""
    with pytest.raises(ConfigError, match=r"^tokenizer\.from: expected str"):
        load_config(None, ["tokenizer.from=[1]"])
    with pytest.raises(ConfigError, match=r"^tokenizer\.vocab_size: wordpiece needs at least 625"):
        load_config(None, ["tokenizer.kind=wordpiece", "tokenizer.vocab_size=600"])
    with pytest.raises(ConfigError, match=r"^tokenizer\.pre_tokenizer: 'gpt5' is not one of"):
        load_config(None, ["tokenizer.pre_tokenizer=gpt5"])
    with pytest.raises(ConfigError, match=r"^tokenizer\.cjk: 'chars' does not work with kind 'unigram'"):
        load_config(None, ["tokenizer.kind=unigram", "tokenizer.cjk=chars"])
    with pytest.raises(ConfigError, match=r"^tokenizer\.cjk: 'words' is not one of"):
        load_config(None, ["tokenizer.cjk=words"])
    with pytest.raises(ValueError, match=r"tokenizer\.normalizer: 'nfd' is not one of"):
        train_tokenizer(["a"], TokenizerConfig(normalizer="nfd"), tmp_path / "t.json", False)  # type: ignore[arg-type]


# ---------------------------------------------------------------- tokenizer.from


def save_hf_tokenizer(folder, vocab_size: int = 300, truncation: int | None = None) -> None:
    """A small Llama-style tokenizer saved by transformers, built here: never from the hub."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  show_progress=False)
    tok.train_from_iterator(corpus(20_000), trainer=trainer)
    if truncation:
        tok.enable_truncation(truncation)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)


def test_stage_imports_a_transformers_tokenizer(tmp_path):
    from lmforge.stages import RunPaths, stage_tokenizer

    save_hf_tokenizer(tmp_path / "hf")
    cfg = load_config(None, [f"out_dir={tmp_path / 'run'}", f"tokenizer.from={tmp_path / 'hf'}"])
    result = stage_tokenizer(cfg, progress=False)  # no data stage needed
    path = RunPaths(cfg.out).tokenizer
    assert {k: result[k] for k in ("path", "vocab_size", "from")} == {
        "path": str(path), "vocab_size": 300, "from": str(tmp_path / "hf")}
    assert "unk_token" in result["tiktoken"]  # the reason tiktoken cannot stand in, recorded beside it
    assert result["bytes_per_token"] is None  # no clean documents yet to measure it on
    assert path.read_bytes() == (tmp_path / "hf" / "tokenizer.json").read_bytes()  # copied as is
    special = sp.load_special_tokens(path)
    assert sp.special_tokens_path(path).is_file()
    assert (special.eos, special.bos, special.pad, special.mask, special.sentinels) == (2, 1, 3, None, ())


def test_import_clears_truncation_and_checks_roles(tmp_path):
    save_hf_tokenizer(tmp_path / "hf", truncation=8)
    tokenizer = import_tokenizer(tmp_path / "hf" / "tokenizer.json", tmp_path / "run" / "tokenizer.json")
    text = " ".join(corpus(2_000))
    assert len(tokenizer.encode(text).ids) > 8
    assert json.loads((tmp_path / "run" / "tokenizer.json").read_text())["truncation"] is None
    no_eos = Tokenizer(models.WordLevel({"a": 0, "<s>": 1}, unk_token="a"))
    no_eos.save(str(tmp_path / "no_eos.json"))
    with pytest.raises(sp.MissingRoleError, match="no end-of-document token"):
        import_tokenizer(tmp_path / "no_eos.json", tmp_path / "x" / "tokenizer.json")
    holes = Tokenizer(models.WordLevel({"a": 0, "</s>": 5}, unk_token="a"))
    holes.save(str(tmp_path / "holes.json"))
    with pytest.raises(ValueError, match="has ids up to 5 but 2 tokens"):
        import_tokenizer(tmp_path / "holes.json", tmp_path / "y" / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="tokenizer.from: no tokenizer.json"):
        import_tokenizer(tmp_path / "missing", tmp_path / "z" / "tokenizer.json")


def test_vocabulary_over_65536_reaches_uint32_shards(tmp_path):
    from lmforge.data.document import Document
    from lmforge.tokens.shard_writer import write_token_shards
    from lmforge.tokens.shards import TokenDataset

    words = [f"w{i}" for i in range(70_000)]
    big = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    big.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    big.add_special_tokens(["</s>"])
    big.save(str(tmp_path / "big.json"))
    path = tmp_path / "run" / "tokenizer.json"
    tokenizer = import_tokenizer(tmp_path / "big.json", path)
    assert tokenizer.get_vocab_size() == 70_001
    docs = [Document(id="a", text="w1 w69999 w65536", source="s")]
    summary = write_token_shards(docs, tokenizer, path, tmp_path / "tokens", "train", progress=False)
    assert summary["n_tokens"] == 4
    data = TokenDataset(tmp_path / "tokens", "train")
    assert data.dtype == "uint32"
    assert data.tokens(0, 4).tolist() == [1, 69_999, 65_536, 70_000]  # 70_000: </s>, the EOS role


# ---------------------------------------------------------------- report


def test_measure_counts_bytes_tokens_and_caps(trained):
    from lmforge.tokenizer.report import format_table, measure

    tokenizer = trained[0]
    items = [("en", ENGLISH[0]), ("zh", CHINESE[0]), ("en", ENGLISH[1]), ("zh", CHINESE[1])]
    rows = measure(tokenizer, items)
    en_tokens = sum(len(tokenizer.encode(t).ids) for t in ENGLISH)
    assert rows["en"]["docs"] == 2 and rows["en"]["bytes"] == sum(len(t.encode()) for t in ENGLISH)
    assert rows["en"]["tokens"] == en_tokens
    assert rows["en"]["bytes_per_token"] == pytest.approx(rows["en"]["bytes"] / en_tokens)
    assert rows["all"]["tokens"] == rows["en"]["tokens"] + rows["zh"]["tokens"]
    assert rows["zh"]["chars_per_token"] < rows["zh"]["bytes_per_token"]  # 3 bytes per hanzi
    assert measure(tokenizer, [("x", sp.EOS)])["x"]["tokens"] > 1  # a special token in text counts as text
    capped = measure(tokenizer, items, max_bytes_per_source=1)
    assert capped["en"]["docs"] == capped["zh"]["docs"] == 1
    assert "bytes/token" in format_table(rows) and "zh" in format_table(rows)


def test_tokenizer_report_on_a_run_and_cli(tmp_path, capsys):
    from lmforge.cli import main
    from lmforge.data.doc_shards import ShardWriter
    from lmforge.data.document import Document
    from lmforge.stages import RunPaths
    from lmforge.tokenizer.report import tokenizer_report

    cfg = load_config(None, [f"out_dir={tmp_path}"])
    paths = RunPaths(cfg.out)
    train_tokenizer(corpus(30_000), TokenizerConfig(vocab_size=500), paths.tokenizer, progress=False)
    with ShardWriter(paths.data / "val", docs_per_shard=3) as writer:
        for i, text in enumerate(corpus(6_000, seed=3)):
            writer.write(Document(id=str(i), text=text, source="zh" if text.endswith("。") else "other"))
    report = tokenizer_report(cfg)
    assert set(report["sources"]) == {"zh", "other", "all"}
    assert report["sources"]["all"]["docs"] == writer.n_docs
    assert main(["tokenizer-report", f"out_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "bytes/token" in out and "zh" in out and "val split" in out
