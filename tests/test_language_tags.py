"""Language tags: `<|lang:xx|>` reserved after the fixed roles (no existing id moves), recorded in the
role map, inferred from foreign spellings, written first in each document by the tokenize stage with
tokens.language_tags, and put after the document start by `generate --lang`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import AddedToken, Tokenizer, models
from transformers import PreTrainedTokenizerFast

from lmforge.cli import _parser
from lmforge.config import ConfigError, TokenizerConfig
from lmforge.data.doc_shards import read_documents
from lmforge.data.document import Document
from lmforge.eval.generate import document_start, generate
from lmforge.recipe import load_config
from lmforge.stages import RunPaths, _sample, stage_data, stage_tokenize, stage_tokenizer
from lmforge.tokenizer import special_tokens as sp
from lmforge.tokenizer.train import import_tokenizer, load_tokenizer, train_tokenizer
from lmforge.tokens import token_sets
from lmforge.tokens.shards import TokenDataset
from lmforge.tokens.token_sets import LANGUAGE_META_KEY, LanguageTagger, tokenize_split

EN = "the model reads the data and learns the next token from the text it has seen before"
ZH = "大规模语言模型的预训练需要高质量的数据和大量的计算资源"
FR = "le modèle lit les données et apprend le prochain mot du texte"
TEXTS = [f"{t} {i}" for i in range(60) for t in (EN, ZH, FR)]


# ------------------------------------------------------------------ training and the role map


@pytest.mark.parametrize("kind,size", [("bpe", 400), ("unigram", 400), ("wordpiece", 700)])
def test_tags_are_reserved_after_the_fixed_roles_for_every_kind(tmp_path, kind, size):
    path = tmp_path / "tokenizer.json"
    tok = train_tokenizer(TEXTS, TokenizerConfig(kind=kind, vocab_size=size, language_tags=["zh", "en"]), path,
                          progress=False)
    for expected, token in enumerate(sp.SPECIAL_TOKENS):  # EOS_ID .. S2S_ID unchanged
        assert tok.token_to_id(token) == expected
    n = len(sp.SPECIAL_TOKENS)
    assert tok.token_to_id("<|lang:zh|>") == n and tok.token_to_id(sp.lang_tag("en")) == n + 1  # config order
    assert tok.token_to_id(sp.sentinel(0)) == tok.get_vocab_size() - 1  # sentinels stay on top
    special = sp.load_special_tokens(path, tok)
    assert special.lang_tags == {"zh": n, "en": n + 1} and {n, n + 1} <= special.ids()
    assert (special.eos, special.s2s) == (sp.EOS_ID, sp.S2S_ID)
    added = {t["content"]: t for t in json.loads(path.read_text())["added_tokens"]}
    assert added["<|lang:zh|>"]["special"] and added["<|lang:zh|>"]["id"] == n
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    assert hf.encode("<|lang:zh|>" + ZH[:4], add_special_tokens=False)[0] == n
    assert hf.convert_tokens_to_ids("<|lang:en|>") == n + 1


def test_default_tokenizer_has_no_tags_and_the_same_ids(tmp_path):
    tok = train_tokenizer(TEXTS, TokenizerConfig(vocab_size=400), tmp_path / "tokenizer.json", progress=False)
    special = sp.load_special_tokens(tmp_path / "tokenizer.json", tok)
    assert special.lang_tags == {} and tok.token_to_id("<|lang:en|>") is None
    assert [tok.token_to_id(t) for t in sp.SPECIAL_TOKENS] == list(range(sp.S2S_ID + 1))


def test_role_map_round_trip_and_old_files():
    special = sp.SpecialTokens(eos=0, pad=1, lang_tags={"en": 13, "zh": 14})
    data = json.loads(json.dumps(special.to_json()))
    assert data["lang_tags"] == {"en": 13, "zh": 14} and sp.SpecialTokens.from_json(data) == special
    del data["lang_tags"]  # written before language tags existed
    assert sp.SpecialTokens.from_json(data).lang_tags == {}
    with pytest.raises(ValueError, match="lang_tags"):
        sp.SpecialTokens.from_json({**data, "lang_tags": ["en"]})


def test_a_saved_tag_that_disagrees_with_the_tokenizer_is_refused(tmp_path):
    path = tmp_path / "tokenizer.json"
    tok = train_tokenizer(TEXTS, TokenizerConfig(vocab_size=400, language_tags=["en"]), path, progress=False)
    saved = json.loads(sp.special_tokens_path(path).read_text())
    saved["lang_tags"] = {"en": 20}
    sp.special_tokens_path(path).write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="language tag 'en'"):
        sp.load_special_tokens(path, tok)


# ------------------------------------------------------------------ foreign spellings


def foreign_tokenizer() -> Tokenizer:
    vocab = {t: i for i, t in enumerate(["</s>", "<pad>", "a", "b", "ja_JP", "__en__"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    tok.add_special_tokens([AddedToken(t, special=True) for t in (
        "<|de|>",  # Whisper-style, before ours: ours wins for "de"
        "<|en|>", "<|haw|>", "en_XX", "zho_Hans", "__fr__", "<|lang:de|>",
        "<|pad|>", "<|eot|>", "<|notimestamps|>", "<|EN|>", "[SEP]",  # roles and non-codes: never tags
    )])
    tok.add_tokens(["de_DE", "__it__"])  # added but not special: a foreign spelling needs special
    return tok


def test_inference_from_foreign_spellings_is_conservative():
    tok = foreign_tokenizer()
    tags = sp.infer_special_tokens(tok).lang_tags
    assert tags == {"de": tok.token_to_id("<|lang:de|>"), "en": tok.token_to_id("<|en|>"),
                    "en_XX": tok.token_to_id("en_XX"), "fr": tok.token_to_id("__fr__"),
                    "haw": tok.token_to_id("<|haw|>"), "zho_Hans": tok.token_to_id("zho_Hans")}
    assert sp.tag_language("ja_XX", special=True) == "ja_XX" and sp.tag_language("ja_XX", special=False) is None
    assert sp.tag_language("<|lang:pt-br|>", special=False) == "pt-br"  # ours counts even unmarked
    assert sp.tag_language("<|bos|>", special=True) is None and sp.tag_language("__eq__", special=False) is None
    # A lone foreign en_XX also serves langid's "en"; an exact code wins.
    assert sp.language_lookup({"ja_XX": 5, "en": 6, "en_XX": 7}) == {"ja_XX": 5, "en": 6, "en_XX": 7, "ja": 5}
    assert "zh" not in sp.language_lookup({"zh_CN": 5, "zh_TW": 6})  # ambiguous: no fallback
    assert sp.language_lookup({"pt-br": 8})["pt"] == 8  # a configured regional code serves langid's base too


def test_imported_tokenizer_saves_inferred_tags(tmp_path):
    source = tmp_path / "foreign.json"
    foreign_tokenizer().save(str(source))
    tok = import_tokenizer(source, tmp_path / "run" / "tokenizer.json")
    saved = json.loads(sp.special_tokens_path(tmp_path / "run" / "tokenizer.json").read_text())
    assert saved["lang_tags"]["haw"] == tok.token_to_id("<|haw|>") and "it" not in saved["lang_tags"]


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("codes,match", [(["EN"], "'EN'"), ([""], "''"), (["e n"], "'e n'"),
                                         (["<|x|>"], "not a language code"), (["en", "en"], "listed twice")])
def test_bad_language_codes_name_the_key(codes, match):
    with pytest.raises(ConfigError, match=f"tokenizer.language_tags: .*{match}"):
        TokenizerConfig(language_tags=codes)


def test_config_keys_and_their_errors():
    cfg = load_config(None, ["tokenizer.language_tags=[en, zh, pt-br]", "tokens.language_tags=true"])
    assert cfg.tokenizer.language_tags == ["en", "zh", "pt-br"] and cfg.tokens.language_tags is True
    assert load_config(None, []).tokenizer.language_tags == [] and not load_config(None, []).tokens.language_tags
    with pytest.raises(ConfigError, match="tokenizer.language_tags"):
        load_config(None, ["tokenizer.language_tags=[en, en]"])
    with pytest.raises(ConfigError, match="tokens.language_tags"):
        load_config(None, ["tokens.language_tags=sometimes"])
    with pytest.raises(ConfigError, match="tokenizer.language_tags: only for a tokenizer lmforge trains"):
        load_config(None, ["tokenizer.language_tags=[en]", "tokenizer.from=some/dir"])
    # WordPiece's least vocabulary makes room for the tags too.
    TokenizerConfig(kind="wordpiece", vocab_size=625)
    with pytest.raises(ConfigError, match="tokenizer.vocab_size: wordpiece needs at least 627"):
        TokenizerConfig(kind="wordpiece", vocab_size=626, language_tags=["en", "zh"])


# ------------------------------------------------------------------ the tokenize stage


def corpus_language(i: int) -> str | None:
    return ["en", "zh", "fr", None][i % 4]  # fr has no tag, None no language: both untagged


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("langtags")
    corpus = root / "corpus.jsonl"
    with corpus.open("w") as f:
        for i in range(200):
            lang = corpus_language(i)
            text = {"en": EN, "zh": ZH, "fr": FR, None: "x = 1; y = 2"}[lang] + f" {i}"
            # An input record's other fields become meta: "language" is what the langid filter writes.
            rec = {"id": str(i), "text": text, "source": ["web", "code"][i % 3 == 0], LANGUAGE_META_KEY: lang}
            f.write(json.dumps({k: v for k, v in rec.items() if v is not None}, ensure_ascii=False) + "\n")
    out = root / "run"
    cfg = config(out, corpus, "tokenizer.language_tags=[en, zh]")
    stage_data(cfg, progress=False)
    stage_tokenizer(cfg, progress=False)
    return out


def config(out: Path, corpus: Path | None = None, *overrides: str):
    inputs = [f"data.inputs={corpus}"] if corpus else []
    return load_config(None, [f"out_dir={out}", *inputs, "data.filters=[]", "data.dedup=none",
                              "tokenizer.vocab_size=400", "data.val_fraction=0.2", *overrides])


def test_langid_filter_writes_the_key_the_stage_reads():
    from lmforge.data.filters.langid import LangId

    doc, _ = LangId(min_prob=0.0).process(Document("1", EN, "web"))
    assert doc is not None and doc.meta[LANGUAGE_META_KEY] == "en"


def test_tokenize_stage_writes_each_documents_tag_first_and_counts_them(run_dir):
    out = stage_tokenize(config(run_dir, None, "tokens.language_tags=true"), progress=False)
    tok = load_tokenizer(RunPaths(run_dir).tokenizer)
    special = sp.load_special_tokens(RunPaths(run_dir).tokenizer, tok)
    assert out["encoder"] == "tiktoken" and out["train"]["language_tags"] == special.lang_tags
    docs: dict[str, list[Document]] = {}
    for doc in read_documents(RunPaths(run_dir).data / "train"):
        docs.setdefault(doc.source, []).append(doc)
    for source, expected in docs.items():
        ds = TokenDataset(RunPaths(run_dir).tokens / "train", source)
        assert ds.n_docs == len(expected)
        starts = ds.doc_starts
        for i, doc in enumerate(expected):
            ids = ds.tokens(int(starts[i]), int(starts[i + 1])).tolist()
            tag = special.lang_tags.get(doc.meta.get(LANGUAGE_META_KEY))
            assert ids[-1] == special.eos
            if tag is None:
                assert ids[0] not in special.lang_tags.values() and tok.decode(ids[:-1]) == doc.text
            else:
                assert ids[0] == tag and tok.decode(ids[1:-1]) == doc.text
        langs = [d.meta.get(LANGUAGE_META_KEY) for d in expected]
        counts = out["train"]["sources"][source]["language_tags"]
        assert counts == {"tagged": {c: langs.count(c) for c in ("en", "zh") if c in langs},
                          "untagged": sum(lang not in ("en", "zh") for lang in langs)}
    assert sum(s["language_tags"]["untagged"] for s in out["val"]["sources"].values()) > 0


def test_tagged_stage_writes_the_same_bytes_through_the_per_text_encoder(run_dir, monkeypatch):
    cfg = config(run_dir, None, "tokens.language_tags=true")
    joined = stage_tokenize(cfg, progress=False)
    first = token_files(run_dir)
    real, calls = token_sets.tokenize_splits, []

    def per_text(*args, **kwargs):
        calls.append(kwargs.pop("encode_joined"))
        return real(*args, **kwargs)

    monkeypatch.setattr(token_sets, "tokenize_splits", per_text)
    assert stage_tokenize(cfg, progress=False) == joined and token_files(run_dir) == first and calls[0] is not None


def token_files(out: Path) -> dict[str, bytes]:
    tokens = RunPaths(out).tokens
    return {str(p.relative_to(tokens)): p.read_bytes() for p in sorted(tokens.rglob("*")) if p.is_file()}


def test_default_tokenize_is_untagged_and_refuses_without_tags(run_dir, tmp_path):
    plain = stage_tokenize(config(run_dir), progress=False)
    assert "language_tags" not in plain["train"] and "language_tags" not in plain["train"]["sources"]["web"]
    other = tmp_path / "run"
    shutil.copytree(RunPaths(run_dir).data, RunPaths(other).data)
    stage_tokenizer(config(other), progress=False)  # no tokenizer.language_tags
    with pytest.raises(ConfigError, match="tokens.language_tags: .*set tokenizer.language_tags"):
        stage_tokenize(config(other, None, "tokens.language_tags=true"), progress=False)


def tagged_docs() -> dict[str, list[Document]]:
    rng = np.random.default_rng(0)
    words = ["data", "模型", "token", "数据", "x=1;", "the"]
    return {f"shard-{k:05d}": [
        Document(f"{k}-{i}", " ".join(rng.choice(words, rng.integers(1, 20))), ["web", "code"][int(rng.integers(2))],
                 {} if (lang := ["en", "zh", "de", None][int(rng.integers(4))]) is None else {LANGUAGE_META_KEY: lang})
        for i in range(30)] for k in range(3)}


def fake_encode(texts: list[str]) -> list[list[int]]:
    return [[20 + (b % 200) for b in t.encode("utf-8")] for t in texts]


def fake_joined(texts: list[str], sep: int) -> tuple[np.ndarray, list[int]]:
    ids = fake_encode(texts)
    return np.array([t for doc in ids for t in (*doc, sep)], dtype=np.uint32), [len(d) + 1 for d in ids]


def run_split(root: Path, shards: dict[str, list[Document]], crash_at: str | None = None, **kwargs) -> dict:
    inputs = []
    for name, docs in shards.items():
        (root / "data").mkdir(parents=True, exist_ok=True)
        (root / "data" / name).write_text(json.dumps([d.id for d in docs]))
        inputs.append(root / "data" / name)

    def read(path: Path):
        if path.name == crash_at:
            raise KeyboardInterrupt("killed")
        return iter(shards[path.name])

    return tokenize_split(inputs, read, fake_encode, root / "tokens", "train", "f" * 64, 256, 0, progress=False,
                          tagger=LanguageTagger({"en": 13, "zh": 14}), **kwargs)


def test_both_encoder_paths_write_the_same_tagged_bytes_and_resume_keeps_counts(tmp_path):
    shards = tagged_docs()
    per_text = run_split(tmp_path / "one", shards)
    joined = run_split(tmp_path / "joined", shards, encode_joined=fake_joined)
    assert per_text == joined
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert len(files) > 4
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "joined" / f).read_bytes(), f
    docs = [d for docs in shards.values() for d in docs]
    assert sum(s["language_tags"]["tagged"].get("en", 0) for s in per_text["sources"].values()) == \
        sum(d.meta.get(LANGUAGE_META_KEY) == "en" for d in docs)
    with pytest.raises(KeyboardInterrupt):  # killed after the first two input shards
        run_split(tmp_path / "resumed", shards, crash_at="shard-00002")
    assert run_split(tmp_path / "resumed", shards) == per_text


# ------------------------------------------------------------------ generation


class StubDecoder(torch.nn.Module):
    """Records what it is fed and always predicts EOS (id 0)."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(max_seq_len=64, vocab_size=vocab_size, family="decoder", arch="decoder")
        self.seen: list[list[int]] = []

    def forward(self, ids: torch.Tensor, **_: object) -> torch.Tensor:
        self.seen.append(ids[0].tolist())
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.cfg.vocab_size)
        logits[..., sp.EOS_ID] = 1.0
        return logits


def test_generate_lang_starts_the_prompt_with_document_start_and_the_tag(run_dir):
    tok = load_tokenizer(RunPaths(run_dir).tokenizer)
    special = sp.load_special_tokens(RunPaths(run_dir).tokenizer, tok)
    zh = special.lang_tags["zh"]
    assert document_start(special, "zh") == [*document_start(special), zh] == [special.eos, zh]
    model = StubDecoder(tok.get_vocab_size())
    generate(model, tok, "the", special=special, max_new_tokens=2, temperature=0, lang="zh")
    assert model.seen[0] == [special.eos, zh, *tok.encode("the", add_special_tokens=False).ids]
    with pytest.raises(sp.MissingRoleError, match="no language tag for 'fr'.*en, zh"):
        document_start(special, "fr")
    # The stage behind `lmforge generate --lang`: an unknown code is the command's error.
    assert _parser().parse_args(["generate", "--lang", "zh"]).lang == "zh"
    cfg = config(run_dir, None, "eval.generate.max_new_tokens=2", "eval.generate.temperature=0")
    _sample(cfg, model, torch.device("cpu"), "the", lang="en")
    assert model.seen[-1][:2] == [special.eos, special.lang_tags["en"]]
    with pytest.raises(ConfigError, match="--lang: no language tag for 'fr'; this tokenizer's tags: en, zh"):
        _sample(cfg, model, torch.device("cpu"), "the", lang="fr")


def test_fim_keeps_a_documents_language_tag_in_front(run_dir):
    """FIM decodes a document to cut it: a tag decoded with the text could be cut into text and lost."""
    from lmforge.objectives import ObjectiveContext, build_objective
    from lmforge.objectives.fim import FIMConfig

    path = RunPaths(run_dir).tokenizer
    tok = load_tokenizer(path)
    special = sp.load_special_tokens(path, tok)
    fim = build_objective(FIMConfig(fim_rate=1.0), ObjectiveContext(special, tok.get_vocab_size(), 0, tok))
    tag = special.lang_tags["en"]
    text = tok.encode(EN, add_special_tokens=False).ids
    row = np.array([special.eos, tag, *text, special.eos, tag, *text, special.eos], dtype=np.int64)
    doc_ids = np.array([0] + [1] * (len(text) + 2) + [2] * (len(text) + 2))
    for seed in range(60):
        out = fim.transform_row(row, doc_ids, seed).tolist()
        assert out[:3] == [special.eos, tag, special.fim_prefix], seed  # tag first, then the transformed text
        assert out.count(tag) == 2, seed
