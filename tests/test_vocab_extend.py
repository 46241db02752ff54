"""Vocabulary extension (old ids kept, new tokens learned on new text) and growing a model to match."""

from __future__ import annotations

import json

import pytest
import torch
from test_tokenizer import SAMPLES, corpus
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from lmforge.cli import main
from lmforge.config import TokenizerConfig
from lmforge.models import build_model
from lmforge.models.decoder import DecoderConfig
from lmforge.models.encoder import EncoderConfig
from lmforge.models.encoder_decoder import EncoderDecoderConfig
from lmforge.models.resize import resize_token_embeddings
from lmforge.tokenizer import special_tokens as sp
from lmforge.tokenizer.extend import extend_vocabulary
from lmforge.tokenizer.train import train_tokenizer

ENGLISH = [t for t in corpus(60_000) if t.isascii()]  # the base sees no Chinese at all
CHINESE = [t for t in corpus(60_000, seed=2) if not t.isascii()]
HELD_OUT_CHINESE = [t for t in corpus(10_000, seed=9) if not t.isascii()]
N_NEW = 60


def build(kind: str, folder) -> None:
    vocab = {"bpe": 600, "wordpiece": 800, "unigram": 600}[kind]
    train_tokenizer(ENGLISH, TokenizerConfig(kind=kind, vocab_size=vocab), folder / "tokenizer.json", progress=False)


@pytest.fixture(scope="module", params=["bpe", "wordpiece"])
def extended(request, tmp_path_factory):
    base_dir, out_dir = tmp_path_factory.mktemp("base"), tmp_path_factory.mktemp("out")
    build(request.param, base_dir)
    report = extend_vocabulary(base_dir, CHINESE, N_NEW, out_dir)
    base = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    return base, Tokenizer.from_file(report["path"]), report, base_dir, out_dir


def test_old_ids_kept_new_ids_appended(extended):
    base, ext, report, _, _ = extended
    old = base.get_vocab(with_added_tokens=True)
    assert all(ext.token_to_id(token) == i for token, i in old.items())  # roles and sentinels included
    assert report["added"] == N_NEW == len(report["new_tokens"])
    assert ext.get_vocab_size() == report["vocab_size_after"] == base.get_vocab_size() + N_NEW
    new_ids = sorted(ext.token_to_id(t) for t in report["new_tokens"])
    assert new_ids == list(range(base.get_vocab_size(), base.get_vocab_size() + N_NEW))  # after the sentinels
    assert not set(report["new_tokens"]) & set(old)


def test_new_text_compresses_better_old_text_encodes_the_same(extended):
    base, ext, report, _, _ = extended
    assert report["bytes_per_token_after"] > 1.5 * report["bytes_per_token_before"]
    held = " ".join(HELD_OUT_CHINESE)
    assert len(ext.encode(held).ids) < 0.8 * len(base.encode(held).ids)  # generalises past the texts
    assert any(i >= base.get_vocab_size() for i in ext.encode(held).ids)
    for text in ENGLISH[:40] + ["def f(x):\n    return x  # ok"]:  # the new merges touch no ASCII
        assert ext.encode(text).ids == base.encode(text).ids


def test_round_trip_and_transformers_parity(extended):
    _, ext, report, _, _ = extended
    hf = PreTrainedTokenizerFast(tokenizer_file=report["path"])
    assert len(hf) == ext.get_vocab_size()
    for text in SAMPLES + CHINESE[:5] + ENGLISH[:5]:
        ids = ext.encode(text).ids
        assert ext.decode(ids, skip_special_tokens=False) == text
        assert hf.encode(text, add_special_tokens=False) == ids


def test_role_map_saved_unchanged(extended):
    base, ext, report, base_dir, out_dir = extended
    saved = json.loads((out_dir / sp.SPECIAL_FILE).read_text())
    assert saved == json.loads((base_dir / sp.SPECIAL_FILE).read_text())
    special = sp.load_special_tokens(out_dir / "tokenizer.json", ext)  # checked against the tokenizer
    assert special.sentinels[0] == base.get_vocab_size() - 1 == ext.token_to_id("<extra_id_0>")
    assert ext.encode(sp.EOS + sp.sentinel(0)).ids == [sp.EOS_ID, special.sentinels[0]]


def test_bpe_merges_are_appended_after_the_base_merges(tmp_path):
    build("bpe", tmp_path)
    report = extend_vocabulary(tmp_path, CHINESE, 10, tmp_path / "out")
    old = json.loads((tmp_path / "tokenizer.json").read_text())["model"]
    new = json.loads((tmp_path / "out" / "tokenizer.json").read_text())["model"]
    assert new["merges"][: len(old["merges"])] == old["merges"]
    added = new["merges"][len(old["merges"]):]
    assert ["".join(m) for m in added] == report["new_tokens"]  # every new token is a merge's product


def test_refusals(tmp_path):
    build("unigram", tmp_path)
    with pytest.raises(ValueError, match="a Unigram tokenizer cannot be extended"):
        extend_vocabulary(tmp_path, CHINESE, 10, tmp_path / "out")
    with pytest.raises(ValueError, match="n_new must be >= 1"):
        extend_vocabulary(tmp_path, CHINESE, 0, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="base tokenizer not found"):
        extend_vocabulary(tmp_path / "missing", CHINESE, 10, tmp_path / "out")


def test_cli_extend_vocab(tmp_path, capsys):
    build("bpe", tmp_path / "base")
    (tmp_path / "zh.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in CHINESE))
    args = ["extend-vocab", "--base", str(tmp_path / "base"), "--texts", str(tmp_path / "zh.jsonl"),
            "--n-new", "25", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["added"] == 25 and printed["vocab_size_after"] == 625
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (tmp_path / "out" / sp.SPECIAL_FILE).is_file()


# ---------------------------------------------------------------- resize_token_embeddings

OLD, NEW = 97, 110
MODELS = {
    "decoder-tied": DecoderConfig(vocab_size=OLD, d_model=32, n_layers=1, n_heads=4, max_seq_len=32),
    "decoder-untied": DecoderConfig(vocab_size=OLD, d_model=32, n_layers=1, n_heads=4, max_seq_len=32,
                                    tie_embeddings=False),
    "encoder": EncoderConfig(vocab_size=OLD, d_model=32, n_layers=1, n_heads=4, max_seq_len=32),
    "t5": EncoderDecoderConfig(vocab_size=OLD, d_model=32, n_layers=1, n_heads=4, d_kv=8, d_ff=48, max_seq_len=32),
    "bart": EncoderDecoderConfig(variant="bart", vocab_size=OLD, d_model=32, n_layers=1, n_heads=4, max_seq_len=32),
}


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    if model.cfg.family == "encoder_decoder":
        return model(ids, decoder_input_ids=ids.flip(1))
    out = model(ids)
    return out["logits"] if isinstance(out, dict) else out  # an encoder with an NSP head


def vocab_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every vocabulary-sized parameter or buffer, by name."""
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    return {n: t for n, t in tensors.items() if model.cfg.vocab_size in t.shape}


@pytest.mark.parametrize("name", list(MODELS))
def test_resize_keeps_old_logits_and_starts_new_rows_at_the_mean(name):
    torch.manual_seed(0)
    cfg = MODELS[name]
    model = build_model(type(cfg)(**vars(cfg))).eval()
    with torch.no_grad():
        for tensor in vocab_tensors(model).values():  # biases start at zero: make their mean visible
            tensor.add_(torch.randn_like(tensor) * 0.1)
    before = {n: t.detach().clone() for n, t in vocab_tensors(model).items()}
    ids = torch.randint(0, OLD, (2, 12))
    with torch.no_grad():
        expected = logits(model, ids)
    shared_before = {id(t) for t in dict(model.named_parameters()).values()}
    assert resize_token_embeddings(model, NEW) is model
    assert model.cfg.vocab_size == NEW
    after = vocab_tensors(model)
    assert set(after) == set(before)  # the same tensors, all grown
    for n, old in before.items():
        new, dim = after[n], old.shape.index(OLD)
        assert new.shape[dim] == NEW
        assert torch.equal(new.narrow(dim, 0, OLD), old)
        mean = old.mean(dim, keepdim=True).expand_as(new.narrow(dim, OLD, NEW - OLD))
        assert torch.allclose(new.narrow(dim, OLD, NEW - OLD), mean)
    assert len({id(t) for t in dict(model.named_parameters()).values()}) == len(shared_before)  # ties kept
    with torch.no_grad():
        got = logits(model, ids)
    assert got.shape[-1] == NEW
    torch.testing.assert_close(got[..., :OLD], expected, atol=1e-5, rtol=1e-5)
    # A checkpoint of the grown model loads into a model built at the new size.
    build_model(type(cfg)(**{**vars(cfg), "vocab_size": NEW})).load_state_dict(model.state_dict())


def test_resize_ties_buffers_and_training():
    torch.manual_seed(0)
    tied = build_model(DecoderConfig(**{**vars(MODELS["decoder-tied"])}))
    resize_token_embeddings(tied, NEW)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    untied = build_model(DecoderConfig(**{**vars(MODELS["decoder-untied"])}))
    resize_token_embeddings(untied, NEW)
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    bart = build_model(EncoderDecoderConfig(**vars(MODELS["bart"])))
    resize_token_embeddings(bart, NEW)
    assert "final_logits_bias" in dict(bart.named_buffers())  # still a buffer, not trainable
    assert bart.lm_head.weight is bart.shared.weight
    # New ids embed and train: gradients reach the new rows.
    ids = torch.arange(OLD, NEW).unsqueeze(0)
    tied(ids).logsumexp(-1).sum().backward()
    assert tied.embed_tokens.weight.grad[OLD:].abs().sum() > 0
    with pytest.raises(ValueError, match="only growing"):
        resize_token_embeddings(tied, OLD - 1)
    assert resize_token_embeddings(tied, NEW) is tied  # same size: nothing to do


def test_extended_tokenizer_and_resized_model_work_together(extended):
    base, ext, _, _, _ = extended
    model = build_model(DecoderConfig(vocab_size=base.get_vocab_size(), d_model=32, n_layers=1, n_heads=4,
                                      max_seq_len=256))
    resize_token_embeddings(model, ext.get_vocab_size())
    ids = torch.tensor([ext.encode(HELD_OUT_CHINESE[0]).ids[:200]])
    assert ids.max() >= base.get_vocab_size()
    assert model(ids).shape == (1, ids.shape[1], ext.get_vocab_size())
