"""T5 span corruption: T5's lengths, measured noise statistics, exact reconstruction, sentinel
numbering, document boundaries, Chinese text."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.config import ConfigError, TokenizerConfig
from lmforge.objectives import Batch, ObjectiveContext, build_objective
from lmforge.objectives.span_corruption import SpanCorruptionConfig, seq_len_for, t5_lengths
from lmforge.recipe import load_config
from lmforge.tokenizer.special_tokens import MissingRoleError, SpecialTokens, infer_special_tokens
from lmforge.tokenizer.train import train_tokenizer

VOCAB = 1000
SENTINELS = tuple(range(VOCAB - 1, VOCAB - 101, -1))  # <extra_id_0> is the highest id
SPECIAL = SpecialTokens(eos=0, pad=1, mask=3, nlu=10, nlg=11, s2s=12, sentinels=SENTINELS)
FIRST, LAST = 13, VOCAB - 100  # ordinary tokens


def objective(seed: int = 7, special: SpecialTokens = SPECIAL, vocab: int = VOCAB, **options):
    return build_objective(SpanCorruptionConfig(**options), ObjectiveContext(special, vocab, seed))


def pack(docs: list[np.ndarray], width: int, eos: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One packed row: each document followed by EOS (carrying its id), cut to `width`."""
    tokens = np.concatenate([np.append(d, eos) for d in docs])[:width]
    ids = np.concatenate([np.full(d.size + 1, i) for i, d in enumerate(docs)])[:width]
    assert tokens.size == width, "documents too short for the row"
    return tokens, ids


def batch_of(rows: list[tuple[np.ndarray, np.ndarray]], sample_ids: list[int] | None = None) -> Batch:
    ids = np.arange(len(rows)) if sample_ids is None else np.asarray(sample_ids)
    return Batch(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]), ids.astype(np.int64))


def random_docs(rng: np.random.Generator, lengths: list[int]) -> list[np.ndarray]:
    return [rng.integers(FIRST, LAST, n) for n in lengths]


def segments(ex, r: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(encoder tokens, decoder labels) of each packed example of row r, in order."""
    enc_seg, dec_seg = ex.layout.segment_ids[r].numpy(), ex.decoder_layout.segment_ids[r].numpy()
    out = []
    for s in range(1, enc_seg.max() + 1):
        out.append((ex.input_ids[r].numpy()[enc_seg == s], ex.labels[r].numpy()[dec_seg == s]))
    assert set(np.unique(dec_seg)) - {0} == set(np.unique(enc_seg)) - {0}, "decoder and encoder segments differ"
    return out


def parse(inputs: np.ndarray, targets: np.ndarray, sentinels: tuple[int, ...] = SPECIAL.sentinels):
    """(original piece, its noise mask, span lengths) of one example: each input sentinel replaced by
    what follows it in the targets. Checks T5's numbering: <extra_id_0>, <extra_id_1>, ... in order on
    both sides, targets opening with a sentinel, no empty span."""
    assert inputs[-1] == SPECIAL.eos and targets[-1] == SPECIAL.eos
    index = {s: k for k, s in enumerate(sentinels)}
    assert targets[0] in index, "targets must open with a sentinel"
    fills: list[list[int]] = []
    for t in targets[:-1].tolist():
        if t in index:
            assert index[t] == len(fills), "target sentinels out of order"
            fills.append([])
        else:
            fills[-1].append(t)
    used = [index[t] for t in inputs[:-1].tolist() if t in index]
    assert used == list(range(len(fills))), "input sentinels must be <extra_id_0>, <extra_id_1>, ... in order"
    assert all(fills), "every sentinel hides at least one token"
    original: list[int] = []
    mask: list[bool] = []
    for t in inputs[:-1].tolist():
        hidden = fills[index[t]] if t in index else [t]
        original += hidden
        mask += [t in index] * len(hidden)
    return original, np.array(mask), [len(f) for f in fills]


def reconstruct(inputs: np.ndarray, targets: np.ndarray, sentinels: tuple[int, ...] = SPECIAL.sentinels) -> list[int]:
    return parse(inputs, targets, sentinels)[0]


def row_pieces(docs: list[np.ndarray], width: int) -> list[list[int]]:
    """The document pieces a packed row of `width` holds, EOS removed, in order."""
    starts = np.cumsum([0] + [d.size + 1 for d in docs])
    return [d[: width - start].tolist() for d, start in zip(docs, starts, strict=False) if start < width]


def check_layout(ex, seq_len: int, target_len: int) -> None:
    """Shapes, decoder inputs shifted per segment, positions restarting per segment, loss on targets."""
    assert ex.input_ids.shape[1] == seq_len and ex.labels.shape[1] == target_len
    assert not ex.layout.causal and ex.decoder_layout.causal
    dec_seg = ex.decoder_layout.segment_ids
    assert torch.equal(ex.loss_mask, (dec_seg > 0).float())
    for r in range(ex.labels.shape[0]):
        for s in dec_seg[r].unique().tolist():
            if s == 0:
                continue
            where = dec_seg[r] == s
            labels, dec_in = ex.labels[r][where], ex.decoder_input_ids[r][where]
            assert dec_in[0] == SPECIAL.pad and torch.equal(dec_in[1:], labels[:-1])
            assert torch.equal(ex.decoder_position_ids[r][where], torch.arange(int(where.sum())))
            enc_where = ex.layout.segment_ids[r] == s
            assert torch.equal(ex.position_ids[r][enc_where], torch.arange(int(enc_where.sum())))
        pads = ex.layout.segment_ids[r] == 0
        assert (ex.input_ids[r][pads] == SPECIAL.pad).all()


def test_t5_lengths_oracle():
    assert t5_lengths(512) == (568, 114)
    assert t5_lengths(1024) == (1137, 229)
    assert t5_lengths(2048) == (2274, 456)
    obj = objective()
    assert obj.window(512) == 568
    assert all(seq_len_for(obj.window, obj.window(s)) == s for s in range(3, 700))


def test_one_document_fills_input_and_target_exactly():
    rng = np.random.default_rng(0)
    obj = objective()
    width = obj.window(512)
    doc = rng.integers(FIRST, LAST, width)
    ex = obj(batch_of([(doc, np.zeros(width, dtype=np.int64))]))
    assert ex.input_ids.shape == (1, 512) and ex.labels.shape == (1, 114)
    assert (ex.layout.segment_ids == 1).all() and (ex.decoder_layout.segment_ids == 1).all()
    assert reconstruct(*segments(ex, 0)[0]) == doc.tolist()


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=8),
    seq_len=st.integers(4, 80),
    sample_id=st.integers(0, 10**6),
)
def test_inputs_and_targets_reconstruct_each_document(lengths: list[int], seq_len: int, sample_id: int):
    rng = np.random.default_rng(sample_id)
    obj = objective()
    width = obj.window(seq_len)
    docs = random_docs(rng, [*lengths, width])  # a last long document fills the row
    tokens, ids = pack(docs, width)
    ex = obj(batch_of([(tokens, ids)], [sample_id]))
    check_layout(ex, seq_len, t5_lengths(seq_len, max_spans=100)[1])
    # Pieces as the row holds them: too-short ones (one token) are skipped; the last may be cut.
    pieces = row_pieces(docs, width)
    expected = [p for p in pieces if len(p) >= 2]
    got = [reconstruct(inp, tgt) for inp, tgt in segments(ex, 0)]
    assert bool(got) == bool(expected)
    if got:
        assert got[:-1] == expected[: len(got) - 1]
        assert got[-1] == expected[len(got) - 1][: len(got[-1])]
    # One-token pieces are counted until the row is full (the next long piece found no room).
    long = [i for i, p in enumerate(pieces) if len(p) >= 2]
    stop = long[len(got)] if len(got) < len(long) else len(pieces)
    assert obj.skipped == sum(1 for p in pieces[:stop] if len(p) == 1)


def test_noise_never_crosses_a_document():
    # Document d draws its tokens from its own id range, so any mixing would show.
    rng = np.random.default_rng(1)
    obj = objective()
    width = obj.window(96)
    rows = []
    for _ in range(50):
        lengths = [*rng.integers(2, 40, 7), width]
        docs = [rng.integers(FIRST + 100 * d, FIRST + 100 * (d + 1), n) for d, n in enumerate(lengths)]
        rows.append(pack(docs, width))
    ex = obj(batch_of(rows))
    sentinels = set(SPECIAL.sentinels) | {SPECIAL.eos}
    for r in range(len(rows)):
        for inputs, targets in segments(ex, r):
            owners = {(int(t) - FIRST) // 100 for t in np.concatenate([inputs, targets]) if int(t) not in sentinels}
            assert len(owners) == 1


def test_measured_noise_density_and_mean_span():
    rng = np.random.default_rng(2)
    obj = objective()
    width = obj.window(256)
    rows = [pack(random_docs(rng, list(rng.integers(60, 400, 4))), width) for _ in range(300)]
    ex = obj(batch_of(rows))
    noise = tokens = 0
    spans: list[int] = []
    deciles = []  # noise rate along each piece
    for r in range(len(rows)):
        for inputs, targets in segments(ex, r):
            _, mask, lengths = parse(inputs, targets)
            noise, tokens, spans = noise + int(mask.sum()), tokens + mask.size, spans + lengths
            if mask.size >= 50:
                deciles.append([part.mean() for part in np.array_split(mask, 10)])
            assert not mask[0], "pieces start with non-noise"
    assert abs(noise / tokens - 0.15) < 0.01
    assert abs(np.mean(spans) - 3.0) < 0.15
    # Spread evenly along the piece, except at the ends: T5's layout opens on non-noise and ends on noise.
    along = np.mean(deciles, axis=0)
    assert np.ptp(along[1:9]) < 0.04 and along[9] > along[:9].max() and along[0] < 0.15


def test_other_density_and_span():
    rng = np.random.default_rng(3)
    obj = objective(noise_density=0.4, mean_span=6.0)
    width = obj.window(200)
    ex = obj(batch_of([pack(random_docs(rng, [width]), width) for _ in range(100)]))
    noise = tokens = spans = 0
    for r in range(100):
        for inputs, targets in segments(ex, r):
            k = int(np.isin(targets, SPECIAL.sentinels).sum())
            noise, spans, tokens = noise + targets.size - 1 - k, spans + k, tokens + len(reconstruct(inputs, targets))
    assert abs(noise / tokens - 0.4) < 0.01
    assert abs(noise / spans - 6.0) < 0.3


def test_sentinels_are_capped_to_those_configured():
    rng = np.random.default_rng(4)
    obj = objective(n_sentinels=5)
    width = obj.window(300)
    ex = obj(batch_of([pack(random_docs(rng, [width]), width)]))
    inputs, targets = segments(ex, 0)[0]
    sentinels = SPECIAL.sentinels[:5]
    assert int(np.isin(inputs, sentinels).sum()) == 5
    original = pack(random_docs(np.random.default_rng(4), [width]), width)[0]
    assert reconstruct(inputs, targets, sentinels) == original.tolist()
    with pytest.raises(MissingRoleError, match="sentinel"):
        objective(special=SpecialTokens(eos=0, pad=1, sentinels=(99, 98)), vocab=100)
    with pytest.raises(MissingRoleError, match="pad"):
        objective(special=SpecialTokens(eos=0, sentinels=SENTINELS))


def test_short_pieces_are_skipped_and_counted():
    obj = objective()
    width = obj.window(16)
    tokens = np.tile([50, 0], width)[:width]  # one-token documents only
    ids = np.repeat(np.arange(width), 2)[:width]
    ex = obj(batch_of([(tokens, ids)]))
    assert ex.loss_mask.sum() == 0 and (ex.layout.segment_ids == 0).all()
    assert obj.skipped == (width + 1) // 2


def test_same_sample_same_noise_anywhere():
    rng = np.random.default_rng(5)
    obj = objective()
    width = obj.window(64)
    rows = [pack(random_docs(rng, [30, width]), width) for _ in range(4)]
    a = obj(batch_of(rows, [10, 11, 12, 13]))
    b = obj(batch_of(rows[::-1], [13, 12, 11, 10]))
    assert torch.equal(a.input_ids, b.input_ids.flip(0)) and torch.equal(a.labels, b.labels.flip(0))
    c = obj(batch_of(rows, [20, 21, 22, 23]))
    assert not torch.equal(a.input_ids, c.input_ids)
    other_seed = objective(seed=8)(batch_of(rows, [10, 11, 12, 13]))
    assert not torch.equal(a.input_ids, other_seed.input_ids)


def chinese_corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    hanzi = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可里后"
    words = ["model", "data", "train", "token", "the", "of", "and", "text"]
    out = []
    for _ in range(400):
        out.append("".join(rng.choices(hanzi, k=rng.randint(10, 40))) + rng.choice("。！？"))
        out.append(" ".join(rng.choices(words, k=12)) + ".")
    return out


def test_chinese_text_round_trips_with_real_sentinels(tmp_path):
    tok = train_tokenizer(chinese_corpus(), TokenizerConfig(vocab_size=500), tmp_path / "tok.json", progress=False)
    special = infer_special_tokens(tok)
    assert special.sentinels[0] == tok.get_vocab_size() - 1  # <extra_id_0> is the highest id
    obj = objective(special=special, vocab=tok.get_vocab_size())
    texts = [t for t in chinese_corpus(seed=1) if not t.isascii()][:60]
    docs = [np.array(tok.encode(t).ids) for t in texts]
    width = obj.window(64)
    rows = [pack(docs[i : i + 8], width, eos=special.eos) for i in range(0, 48, 6)]
    ex = obj(batch_of(rows))
    complete = 0
    for r, i in enumerate(range(0, 48, 6)):
        pieces = [p for p in row_pieces(docs[i : i + 8], width) if len(p) >= 2]
        for k, (inputs, targets) in enumerate(segments(ex, r)):
            original = reconstruct(inputs, targets, special.sentinels)
            assert original == pieces[k][: len(original)]
            if original == docs[i + k].tolist():  # a whole document: its text comes back exactly
                assert tok.decode(original) == texts[i + k]
                complete += 1
            assert tok.decode(inputs.tolist(), skip_special_tokens=False).startswith(tok.decode(original[:1]))
            assert "<extra_id_0>" in tok.decode(inputs.tolist(), skip_special_tokens=False)
    assert complete >= 8


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("objective.noise_density=0", "objective.noise_density"),
        ("objective.noise_density=1.0", "objective.noise_density"),
        ("objective.mean_span=0.5", "objective.mean_span"),
        ("objective.n_sentinels=0", "objective.n_sentinels"),
    ],
)
def test_bad_options_name_the_key(override: str, key: str):
    base = ["model.arch=encoder_decoder", "objective.name=span_corruption"]
    assert load_config(None, base).objective == SpanCorruptionConfig()
    with pytest.raises(ConfigError, match=key):
        load_config(None, [*base, override])
    with pytest.raises(ConfigError, match="cannot train"):
        load_config(None, ["objective.name=span_corruption"])  # a decoder
