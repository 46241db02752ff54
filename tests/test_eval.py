"""Perplexity/bits-per-byte and the unigram baseline, checked against direct computation."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.eval.perplexity import evaluate, evaluate_sources, unigram_cross_entropy
from lmforge.models import build_model
from lmforge.models.decoder import DecoderConfig as ModelConfig
from lmforge.objectives import ObjectiveContext, build_objective
from lmforge.objectives.lm import LMConfig
from lmforge.tokenizer.special_tokens import SpecialTokens
from lmforge.tokens.shard_writer import ShardWriter
from lmforge.tokens.shards import TokenDataset

VOCAB = 50


def lm(document_mask: bool = False):
    return build_objective(LMConfig(document_mask=document_mask), ObjectiveContext(SpecialTokens(eos=0), VOCAB))


def dataset(root: Path, name: str, seed: int, n_docs: int = 12) -> TokenDataset:
    rng = np.random.default_rng(seed)
    with ShardWriter(root, name, tokenizer_sha256="t", vocab_size=VOCAB) as w:
        for _ in range(n_docs):
            doc = rng.integers(13, VOCAB, size=int(rng.integers(5, 40)))
            w.add(doc, "s", n_bytes=3 * len(doc))
    return TokenDataset(root, name)


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, max_seq_len=64))


def test_loss_equals_direct_cross_entropy_over_every_token(tmp_path: Path, model):
    ds = dataset(tmp_path, "val", 0)
    seq_len = 16
    out = evaluate(model, ds, lm(), seq_len, batch_size=3)
    stream = torch.from_numpy(ds.tokens(0, ds.n_tokens).astype(np.int64))
    nats, count = 0.0, 0
    for start in range(0, ds.n_tokens - 1, seq_len):  # windows of seq_len+1 overlapping by one token
        chunk = stream[start : start + seq_len + 1][None]
        if chunk.shape[1] < 2:
            continue
        with torch.no_grad():
            logits = model(chunk[:, :-1])
        nats += float(F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"))
        count += chunk.shape[1] - 1
    assert out["tokens"] == count == ds.n_tokens - 1
    assert out["loss"] == pytest.approx(nats / count, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(nats / count), rel=1e-5)
    bytes_covered = count * ds.total_bytes / ds.n_tokens
    assert out["bits_per_byte"] == pytest.approx(nats / math.log(2) / bytes_covered, rel=1e-5)


def test_evaluation_uses_the_objectives_layout(tmp_path: Path, model):
    ds = dataset(tmp_path, "val", 1)
    plain = evaluate(model, ds, lm(), 32, batch_size=2)
    masked = evaluate(model, ds, lm(document_mask=True), 32, batch_size=2)
    assert plain["tokens"] == masked["tokens"]
    assert plain["loss"] != pytest.approx(masked["loss"], rel=1e-6)  # attention stopped at document ends


def test_unigram_baseline_matches_formula(tmp_path: Path):
    train, val = dataset(tmp_path, "train", 2, 30), dataset(tmp_path, "val", 3)
    counts = np.bincount(train.tokens(0, train.n_tokens), minlength=VOCAB)
    probs = (counts + 1) / (counts.sum() + VOCAB)
    v = val.tokens(0, val.n_tokens)
    expected = -np.log(probs[v]).mean()
    # From the counts stored at tokenize time, over a split's sources together.
    assert unigram_cross_entropy({"a": train}, {"a": val}, VOCAB) == pytest.approx(expected, rel=1e-9)
    other = dataset(tmp_path, "train2", 4, 10)
    both = np.concatenate([train.tokens(0, train.n_tokens), other.tokens(0, other.n_tokens)])
    probs = (np.bincount(both, minlength=VOCAB) + 1) / (both.size + VOCAB)
    got = unigram_cross_entropy({"a": train, "b": other}, {"a": val}, VOCAB)
    assert got == pytest.approx(-np.log(probs[v]).mean(), rel=1e-9)


def test_evaluation_per_source_and_in_total(tmp_path: Path, model):
    a, b = dataset(tmp_path, "a", 5), dataset(tmp_path, "b", 6, 20)
    out = evaluate_sources(model, {"a": a, "b": b}, lm(), 32, batch_size=2)
    one, two = evaluate(model, a, lm(), 32, batch_size=2), evaluate(model, b, lm(), 32, batch_size=2)
    assert out["sources"] == {"a": one, "b": two}
    assert out["tokens"] == one["tokens"] + two["tokens"]
    weighted = (one["loss"] * one["tokens"] + two["loss"] * two["tokens"]) / out["tokens"]
    assert out["loss"] == pytest.approx(weighted, rel=1e-12)
    bytes_covered = sum(m["tokens"] * d.total_bytes / d.n_tokens for m, d in ((one, a), (two, b)))
    assert out["bits_per_byte"] == pytest.approx(out["loss"] * out["tokens"] / math.log(2) / bytes_covered)
