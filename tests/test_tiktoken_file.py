"""The tiktoken export beside a tokenizer: written once its checks pass, trusted only for the very
tokenizer.json it was checked against, and loadable by plain tiktoken."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tokenizers import Tokenizer

from lmforge.config import BuiltinCorpusConfig, TokenizerConfig
from lmforge.data.builtin import iter_builtin_corpus
from lmforge.tokenizer import fast_encode as fe
from lmforge.tokenizer import tiktoken_file as tf
from lmforge.tokenizer.train import train_tokenizer

TEXTS = ["The quick brown fox: I'll, we'VE.", "大规模语言模型的预训练需要高质量的数据。", "def f(x):\n    return x\n",
         "quoting <|endoftext|> as text", "🤗🚀 e\u0301"]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    docs = iter_builtin_corpus(BuiltinCorpusConfig(max_prose_bytes=80_000, max_code_bytes=80_000))
    return [d.text for d in docs] + ["大规模语言模型的预训练需要高质量的数据。" * 20] * 20


@pytest.fixture
def tokenizer_path(corpus, tmp_path):
    path = tmp_path / "tok" / "tokenizer.json"
    train_tokenizer(corpus, TokenizerConfig(vocab_size=700), path, progress=False)
    return path


def reference(path, texts):
    tok = Tokenizer.from_file(str(path))
    tok.encode_special_tokens = True
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def test_export_holds_the_checked_ranks_and_skips_the_merge_check(tokenizer_path, monkeypatch):
    line = tf.export_tiktoken(tokenizer_path)
    assert "ranks" in line and (tokenizer_path.parent / tf.RANKS_NAME).is_file()
    tok = Tokenizer.from_file(str(tokenizer_path))
    exported = tf.load_export(tokenizer_path)
    assert exported == fe.build_tiktoken_path(tok).ranks  # the same ranks a fresh build derives
    values = sorted(exported[0].values())
    assert json.loads((tokenizer_path.parent / tf.META_NAME).read_text())["rank_range"] == [values[0], values[-1] + 1]
    edit_meta(tokenizer_path, rank_range=None)  # an export without the range: the ranks are parsed per line
    assert tf.load_export(tokenizer_path) == exported

    def no_merge_check(*args, **kwargs):
        raise AssertionError("the per-merge check ran although the export was valid")

    monkeypatch.setattr(fe, "mergeable_ranks", no_merge_check)
    encoder = tf.encoder_for(tok, tokenizer_path, threads=1)
    assert encoder.backend == "tiktoken"
    assert [a.tolist() for a in encoder.encode_arrays(TEXTS)] == reference(tokenizer_path, TEXTS)


def test_plain_tiktoken_loads_the_export(tokenizer_path, monkeypatch):
    tf.export_tiktoken(tokenizer_path)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the file itself, cache nothing
    meta = json.loads((tokenizer_path.parent / tf.META_NAME).read_text())
    assert meta["ids_by_rank"] is None  # lmforge's ids follow merge order: ranks are our ids
    enc = tiktoken.Encoding("mine", pat_str=meta["pat_str"], special_tokens=meta["special_tokens"],
                            mergeable_ranks=load_tiktoken_bpe(str(tokenizer_path.parent / tf.RANKS_NAME)))
    assert [enc.encode_ordinary(t) for t in TEXTS] == reference(tokenizer_path, TEXTS)


def test_a_changed_tokenizer_or_damaged_ranks_are_not_trusted(tokenizer_path):
    tf.export_tiktoken(tokenizer_path)
    ranks = tokenizer_path.parent / tf.RANKS_NAME
    good = ranks.read_bytes()
    ranks.write_bytes(good.replace(b" 300\n", b" 301\n", 1))
    assert tf.load_export(tokenizer_path) is None  # checksum mismatch
    ranks.write_bytes(good)
    assert tf.load_export(tokenizer_path) is not None
    spec = json.loads(tokenizer_path.read_text())
    spec["model"]["merges"] = spec["model"]["merges"][:-1]  # another tokenizer.json now
    tokenizer_path.write_text(json.dumps(spec))
    assert tf.load_export(tokenizer_path) is None
    (tokenizer_path.parent / tf.META_NAME).write_text("{not json")
    assert tf.load_export(tokenizer_path) is None


def test_a_tokenizer_tiktoken_cannot_reproduce_records_why(tokenizer_path, monkeypatch):
    spec = json.loads(tokenizer_path.read_text())
    spec["normalizer"] = {"type": "NFKC"}
    tokenizer_path.write_text(json.dumps(spec))
    line = tf.export_tiktoken(tokenizer_path)
    assert "normalizer" in line and not (tokenizer_path.parent / tf.RANKS_NAME).exists()
    assert "normalizer" in tf.load_export(tokenizer_path)

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt although the export says why the fast path is impossible")

    monkeypatch.setattr(fe, "build_tiktoken_path", no_build)
    encoder = tf.encoder_for(Tokenizer.from_file(str(tokenizer_path)), tokenizer_path, threads=1)
    assert encoder.backend == "tokenizers" and "normalizer" in encoder.reason
    assert [np.asarray(a).tolist() for a in encoder.encode_arrays(TEXTS)] == reference(tokenizer_path, TEXTS)
    monkeypatch.setattr(tiktoken, "__version__", "0.0.1")  # another tiktoken may well manage: ask it again
    assert tf.load_export(tokenizer_path) is None


def test_tokenize_starts_from_the_export_alone_with_the_full_start_s_results(tokenizer_path, corpus, monkeypatch):
    """stage_encoder builds the tokenize stage's encoder, vocabulary size and roles from the export,
    loading no tokenizer, with exactly what loading and checking everything gives."""
    tf.export_tiktoken(tokenizer_path)
    tok = Tokenizer.from_file(str(tokenizer_path))
    full = tf.encoder_for(tok, tokenizer_path, threads=1)
    want_special = tf.load_special_tokens(tokenizer_path, tok)

    def no_load(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded although the export vouches for it")

    monkeypatch.setattr(tf, "load_tokenizer", no_load)
    encoder, vocab_size, special = tf.stage_encoder(tokenizer_path, threads=1)
    assert "as its export recorded" in encoder.reason
    assert (vocab_size, special) == (tok.get_vocab_size(), want_special)
    assert encoder.encode_batch(corpus) == full.encode_batch(corpus) == reference(tokenizer_path, corpus)
    assert encoder.encode_joined(TEXTS, special.eos)[0].tolist() == full.encode_joined(TEXTS, special.eos)[0].tolist()
    # Only EOS is a tiktoken special there: the other specials' texts, even at the joins, stay text.
    others = [t for t in json.loads(tok.to_str())["added_tokens"] if t["id"] != special.eos]
    quoting = [f"a{others[0]['content']}", f"{others[-1]['content']}b{others[1]['content']}", "c"]
    ids, lengths = encoder.encode_joined(quoting, special.eos)
    assert ids.tolist() == [i for ref in reference(tokenizer_path, quoting) for i in (*ref, special.eos)]
    assert lengths == [len(ref) + 1 for ref in reference(tokenizer_path, quoting)]


def edit_meta(path, **changes):
    meta_path = path.parent / tf.META_NAME
    meta = json.loads(meta_path.read_text())
    meta.update(changes)
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("change", ["roles", "tokenizers", "tiktoken", "probe", "ids_by_rank", "no_roles", "old"])
def test_tokenize_loads_the_tokenizer_unless_the_export_vouches_for_everything(tokenizer_path, change, monkeypatch):
    """Another roles file, another tokenizers or tiktoken, probe ids tiktoken no longer gives, ids
    that are not the ranks, or an export from before these records: the full start, checked."""
    tf.export_tiktoken(tokenizer_path)
    roles = tokenizer_path.parent / "special_tokens.json"
    if change == "roles":
        roles.write_text(json.dumps(json.loads(roles.read_text()), indent=4))  # the same roles, another file
    elif change == "tokenizers":
        edit_meta(tokenizer_path, tokenizers_version="0.0.1")
    elif change == "tiktoken":
        monkeypatch.setattr(tiktoken, "__version__", "0.0.1")
    elif change == "probe":
        meta = json.loads((tokenizer_path.parent / tf.META_NAME).read_text())
        edit_meta(tokenizer_path, probe_ids=[ids[::-1] for ids in meta["probe_ids"]])
    elif change == "ids_by_rank":
        edit_meta(tokenizer_path, ids_by_rank=list(range(700)))
    elif change == "no_roles":
        edit_meta(tokenizer_path, special_tokens_xxh64=None)
    else:
        edit_meta(tokenizer_path, probe_ids=None, vocab_size=None, tokenizers_version=None)
    loads = []
    real = tf.load_tokenizer
    monkeypatch.setattr(tf, "load_tokenizer", lambda path: loads.append(path) or real(path))
    encoder, vocab_size, special = tf.stage_encoder(tokenizer_path, threads=1)
    assert loads and "as its export recorded" not in encoder.reason
    assert vocab_size == 700 and encoder.encode_batch(TEXTS) == reference(tokenizer_path, TEXTS)


def test_a_roles_file_that_disagrees_with_the_tokenizer_is_refused_by_name(tokenizer_path):
    tf.export_tiktoken(tokenizer_path)
    roles = tokenizer_path.parent / "special_tokens.json"
    record = json.loads(roles.read_text())
    record["eos"] = record["eos"] + 1 if isinstance(record.get("eos"), int) else record["eos"]
    roles.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="special_tokens.json"):
        tf.stage_encoder(tokenizer_path, threads=1)
