"""Every objective on BOS-aligned best_fit rows: position 0 holds the EOS that opens the row's first
document (its own document id, joined to that document by `separator_segments`), and no objective
treats that lone EOS as a document of its own, or lets attention or a prediction cross pieces.

Rows come from the real loader over a position-coded token set (token at stream position p is
p + 1, EOS = 0), so every token tells which document it came from."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_loader import write_position_coded

from lmforge.objectives.base import ObjectiveContext, build_objective
from lmforge.objectives.fim import FIMConfig
from lmforge.objectives.lm import LMConfig
from lmforge.objectives.mix import MixComponent, MixConfig
from lmforge.objectives.mlm import MLMConfig
from lmforge.objectives.packing import document_spans, separator_segments
from lmforge.objectives.prefix_lm import PrefixLMConfig
from lmforge.objectives.span_corruption import SpanCorruptionConfig
from lmforge.tokenizer.special_tokens import EOS_ID, SpecialTokens
from lmforge.tokens.loader import Batch, PackedLoader
from lmforge.tokens.shards import TokenDataset

EOS = EOS_ID
N_TOKENS = 1500  # data ids are 1..N_TOKENS; special roles live above them
VOCAB = 2000
SENTINELS = tuple(range(VOCAB - 1, VOCAB - 101, -1))
SPECIAL = SpecialTokens(eos=EOS, pad=1880, mask=1881, cls=1882, sep=1883, fim_prefix=1884, fim_middle=1885,
                        fim_suffix=1886, fim_pad=1887, sentinels=SENTINELS)


class CharTokenizer:
    """One CJK character per id: FIM decodes and re-encodes exactly; every 7th id ends a sentence."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(0x4E00 + i) for i in ids)

    def encode(self, text: str, add_special_tokens: bool = False) -> SimpleNamespace:
        return SimpleNamespace(ids=[ord(c) - 0x4E00 for c in text])

    def get_vocab(self) -> dict[str, int]:
        return {(f"w{i}." if i % 7 == 0 else f"\u0120w{i}"): i for i in range(VOCAB)}


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> TokenDataset:
    return write_position_coded(tmp_path_factory.mktemp("bf"), "train", N_TOKENS, seed=5, max_shard_tokens=400)


def objective(cfg, seed: int = 0):
    return build_objective(cfg, ObjectiveContext(SPECIAL, VOCAB, seed, CharTokenizer()))


def best_fit_batch(ds: TokenDataset, window: int, rows: int = 6, seed: int = 0, long_docs: str = "crop") -> Batch:
    return PackedLoader(ds, window, rows, seed=seed, packing="best_fit", long_docs=long_docs,
                        block_docs=50).next_batch()


def doc_of(ds: TokenDataset, tokens: np.ndarray) -> np.ndarray:
    """The document of each (non-EOS) position-coded token."""
    return ds.doc_index(tokens.astype(np.int64) - 1)


@settings(max_examples=25, deadline=None)
@given(window=st.integers(3, 80), seed=st.integers(0, 2**16), long_docs=st.sampled_from(["crop", "split"]))
def test_lm_document_mask_predicts_the_first_token_from_eos_and_never_crosses_pieces(ds, window, seed, long_docs):
    batch = best_fit_batch(ds, window, 4, seed, long_docs)
    ex = objective(LMConfig(document_mask=True))(batch)
    seg, pos = ex.layout.segment_ids.numpy(), ex.position_ids.numpy()
    tokens, ids = batch.tokens, batch.doc_ids
    assert np.array_equal(seg, separator_segments(tokens[:, :-1], ids[:, :-1], EOS))
    doc_starts = set(ds.doc_starts[:-1].tolist())
    for r in range(len(tokens)):
        if tokens[r, 0] == EOS:  # every row, but a split row opening on a continuation piece
            # The first document's first token is a scored target, predicted from the EOS alone.
            assert int(tokens[r, 1]) - 1 in doc_starts and ex.labels[r, 0] == tokens[r, 1]
            assert ex.loss_mask[r, 0] == 1 and seg[r, 0] == seg[r, 1] and pos[r, 0] == 0 and pos[r, 1] == 1
        else:
            assert long_docs == "split" and doc_of(ds, tokens[r, :2])[0] == doc_of(ds, tokens[r, :2])[1]
    # A prediction stays inside its piece, except EOS predicting the first token of the piece it opens.
    assert ((ids[:, :-1] == ids[:, 1:]) | (tokens[:, :-1] == EOS)).all()
    # Attention: a segment's tokens (after its opening EOS) come from one document.
    for r in range(len(tokens)):
        for a, b in document_spans(seg[r]):
            text = tokens[r, a:b][tokens[r, a:b] != EOS]
            assert tokens[r, a + 1 : b].tolist().count(EOS) == 0 and len(set(doc_of(ds, text).tolist())) <= 1


def test_prefix_lm_splits_each_document_with_its_opening_eos(ds) -> None:
    batch = best_fit_batch(ds, 64)
    ex = objective(PrefixLMConfig())(batch)
    seg, prefix, loss = ex.layout.segment_ids.numpy(), ex.layout.prefix.numpy(), ex.loss_mask.numpy()
    for r, (row, ids) in enumerate(zip(batch.tokens, batch.doc_ids, strict=True)):
        spans = document_spans(seg[r])
        assert spans[0][0] == 0 and spans[0][1] > 1  # the leading EOS opens the first document's segment
        for start, stop in spans:
            assert row[start] == EOS
            if stop - start < 2:
                continue
            split = start + int(prefix[r, start:stop].sum())
            assert start < split < stop and prefix[r, start]  # the EOS is inside the bidirectional prefix
            owner = ids[start] + 1  # the id of the document this EOS opens
            assert all(ids[t + 1] == owner for t in range(split - 1, stop) if loss[r, t])


def test_fim_leaves_the_leading_eos_alone_and_transforms_the_first_document(ds) -> None:
    batch = best_fit_batch(ds, 64)
    fim = objective(FIMConfig(fim_rate=1.0))
    for row, ids, sample_id in zip(batch.tokens, batch.doc_ids, batch.sample_ids, strict=True):
        out = fim.transform_row(row, ids, int(sample_id))
        assert out[0] == EOS and out[1] == SPECIAL.fim_prefix
        # Each document fragment became one FIM example: as many <fim_prefix> as documents that fit.
        n_docs = len(document_spans(ids)) - 1
        assert 1 <= int((out == SPECIAL.fim_prefix).sum()) <= n_docs


def test_span_corruption_skips_the_leading_eos_without_counting_it(ds) -> None:
    sc = objective(SpanCorruptionConfig())
    a, b, c = np.arange(10, 16), np.arange(20, 27), np.arange(30, 60)  # documents of 6, 7 and 30 tokens
    row = np.concatenate(([EOS], a, [EOS], b, [EOS], c))[:40]  # as the loader lays a row out
    ids = np.concatenate(([7], np.full(7, 8), np.full(8, 9), np.full(24, 10)))
    assert row.shape == ids.shape
    ex = sc(Batch(row[None], ids[None], np.array([3])))
    assert sc.skipped == 0  # the empty piece before the first document is not a skipped document
    enc, enc_seg = ex.input_ids[0].numpy(), ex.layout.segment_ids[0].numpy()
    kept = [enc[enc_seg == s] for s in (1, 2)]
    assert set(kept[0][kept[0] < 1000].tolist()) - {EOS} <= set(a.tolist())  # example 1 is document a
    assert set(kept[1][kept[1] < 1000].tolist()) - {EOS} <= set(b.tolist())

    batch = best_fit_batch(ds, sc.window(60))
    ex = sc(batch)
    enc, enc_seg = ex.input_ids.numpy(), ex.layout.segment_ids.numpy()
    for r in range(len(batch.tokens)):
        first = enc[r][(enc_seg[r] == 1) & (enc[r] != EOS) & (enc[r] <= N_TOKENS)]
        assert first.size and set(doc_of(ds, first).tolist()) == {int(doc_of(ds, batch.tokens[r, 1:2])[0])}


def test_mlm_never_takes_the_leading_eos_for_a_document(ds) -> None:
    batch = best_fit_batch(ds, 64)
    nsp = objective(MLMConfig(nsp=True, short_seq_prob=0.0))
    for row, ids in zip(batch.tokens, batch.doc_ids, strict=True):
        sentences = nsp._sentences(row, ids)
        assert sentences[0][0] == ids[1] and all(d != ids[0] for d, _ in sentences)
        assert all(EOS not in s.tolist() for _, s in sentences)
    ex = nsp(batch)
    assert not (ex.labels.numpy() == EOS).any()  # sentence pairs hold no separators
    plain = objective(MLMConfig(nsp=False, short_seq_prob=0.0))(batch)
    labels, chosen = plain.labels.numpy(), plain.loss_mask.numpy() == 1
    assert (labels[:, 1] == EOS).all() and not chosen[labels == EOS].any()  # contiguous text; EOS never a target


def test_mix_components_see_the_leading_eos_as_their_first_documents_start(ds) -> None:
    mix = objective(MixConfig(components=[MixComponent(0.5, LMConfig(document_mask=True)),
                                          MixComponent(0.5, PrefixLMConfig())]))
    batch = best_fit_batch(ds, 48, rows=12)
    ex = mix(batch)
    seg, pos = ex.layout.segment_ids.numpy(), ex.position_ids.numpy()
    assert (seg[:, 0] == seg[:, 1]).all() and (pos[:, :2] == [0, 1]).all()
    assert (ex.input_ids[:, 0].numpy() == EOS).all()
