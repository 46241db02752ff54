"""BART noising: measured infilling statistics, whole-word spans, sentence permutation, deletion,
rotation, packing of several documents, Chinese text."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models

from lmforge.config import ConfigError, TokenizerConfig
from lmforge.objectives import Batch, ObjectiveContext, build_objective
from lmforge.objectives.denoising import BartNoisingConfig, TokenClasses
from lmforge.recipe import load_config
from lmforge.tokenizer.special_tokens import SPECIAL_TOKENS, SpecialTokens, infer_special_tokens
from lmforge.tokenizer.train import train_tokenizer

VOCAB = 1000
SPECIAL = SpecialTokens(eos=0, pad=1, mask=3, sentinels=tuple(range(VOCAB - 1, VOCAB - 101, -1)))
MASK = SPECIAL.mask
FIRST, LAST = 13, VOCAB - 100


def word_tokenizer() -> Tokenizer:
    """A vocabulary whose classes are known: even ids start a word ('Ġw..'), odd ids continue one,
    and odd ids ending in 1 also end a sentence ('x..1.')."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for i in range(FIRST, LAST):
        vocab[f"Ġw{i}" if i % 2 == 0 else f"x{i}." if i % 10 == 1 else f"x{i}"] = i
    vocab.update({f"<extra_id_{k}>": VOCAB - 1 - k for k in range(100)})
    return Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS[1]))


TOKENIZER = word_tokenizer()


def objective(seed: int = 3, **options):
    ctx = ObjectiveContext(SPECIAL, VOCAB, seed, TOKENIZER)
    return build_objective(BartNoisingConfig(**options), ctx)


def word_starts(piece: np.ndarray) -> np.ndarray:
    starts = piece % 2 == 0
    starts[0] = True
    return starts


def distinct_rows(n_rows: int, width: int, seed: int = 0) -> Batch:
    """Rows of one document each, no token repeated in a row, so every input token is found in the
    original by its id."""
    rng = np.random.default_rng(seed)
    tokens = np.stack([rng.choice(np.arange(FIRST, LAST), width, replace=False) for _ in range(n_rows)])
    return Batch(tokens, np.zeros_like(tokens), np.arange(n_rows, dtype=np.int64))


def example_of(ex, r: int, s: int = 1) -> tuple[np.ndarray, np.ndarray]:
    enc, dec = ex.layout.segment_ids[r].numpy(), ex.decoder_layout.segment_ids[r].numpy()
    return ex.input_ids[r].numpy()[enc == s], ex.labels[r].numpy()[dec == s]


def alignment(original: np.ndarray, inputs: np.ndarray) -> np.ndarray:
    """Bool [len(original)]: tokens missing from the input (ids are distinct in a row); checks that
    the kept tokens keep their order."""
    kept = inputs[(inputs != MASK) & (inputs != SPECIAL.eos)]
    where = {int(t): i for i, t in enumerate(original)}
    positions = np.array([where[int(t)] for t in kept], dtype=np.int64)
    assert np.all(np.diff(positions) > 0), "kept tokens moved"
    missing = np.ones(original.size, dtype=bool)
    missing[positions] = False
    return missing


def check_whole_words(original: np.ndarray, missing: np.ndarray) -> None:
    starts = word_starts(original)
    # A missing token's word is missing whole: no kept token shares a word with a missing one.
    word = np.cumsum(starts) - 1
    for w in np.unique(word[missing]):
        assert missing[word == w].all(), "a span cut a word"


def test_measured_mask_share_and_mean_span():
    # ~300 words a row: the last span of a budget is cut short, which matters less in long rows.
    seq_len, n_rows = 601, 150
    obj = objective(permute_sentences=False)
    batch = distinct_rows(n_rows, obj.window(seq_len))
    ex = obj(batch)
    masked_words = words = masks = 0
    for r in range(n_rows):
        inputs, targets = example_of(ex, r)
        original = batch.tokens[r]
        assert np.array_equal(targets, np.append(original, SPECIAL.eos)), "targets are the original"
        missing = alignment(original, inputs)
        check_whole_words(original, missing)
        starts = word_starts(original)
        masked_words += int(starts[missing].sum())
        words += int(starts.sum())
        masks += int((inputs == MASK).sum())
        # Each mask stands where a span began: before a word start, another mask or the end.
        after = np.append(inputs, SPECIAL.eos)[1:][inputs == MASK]
        assert np.isin(after, [*original[starts], MASK, SPECIAL.eos]).all()
    assert abs(masked_words / words - 0.3) < 0.01
    assert abs(masked_words / masks - 3.0) < 0.15  # mean span in words, a zero-length span counting 0


def test_sentence_permutation_shuffles_whole_sentences():
    obj = objective(mask_ratio=0.0)
    batch = distinct_rows(50, obj.window(128), seed=1)
    ex = obj(batch)
    moved = 0
    for r in range(50):
        inputs, targets = example_of(ex, r)
        original = batch.tokens[r]
        assert np.array_equal(targets[:-1], original) and inputs[-1] == SPECIAL.eos

        # Tokens are distinct: label each input token with its original sentence; the input must
        # be whole sentences, each once, in some order.
        cuts = np.flatnonzero(original[:-1] % 10 == 1) + 1
        sentences = np.split(original, cuts)
        label = {int(t): k for k, sent in enumerate(sentences) for t in sent}
        labels = [label[int(t)] for t in inputs[:-1]]
        runs = [labels[i] for i in range(len(labels)) if i == 0 or labels[i] != labels[i - 1]]
        assert sorted(runs) == list(range(len(sentences)))
        assert np.array_equal(np.concatenate([sentences[k] for k in runs]), inputs[:-1])
        moved += not np.array_equal(inputs[:-1], original)
    assert moved >= 45


def test_sentences_start_words_wherever_they_land():
    noise = objective().noise
    piece = np.array([20, 31, 33, 41, 43, 45, 51, 55])  # sentences [20 31.] [33 41.] [43 45 51.] [55]
    for seed in range(20):
        tokens, starts = noise.permute(piece, noise.classes.word_starts(piece), np.random.default_rng(seed))
        firsts = {20, 33, 43, 55}
        assert starts.tolist() == [int(t) in firsts for t in tokens]


def test_permutation_with_infilling_keeps_the_token_multiset():
    obj = objective()
    batch = distinct_rows(50, obj.window(128), seed=2)
    ex = obj(batch)
    for r in range(50):
        inputs, targets = example_of(ex, r)
        kept = inputs[(inputs != MASK)][:-1]
        assert set(kept.tolist()) <= set(batch.tokens[r].tolist()) and len(set(kept.tolist())) == kept.size
        assert np.array_equal(targets[:-1], batch.tokens[r])


def test_token_deletion_removes_whole_words():
    obj = objective(permute_sentences=False, delete_tokens=True)
    batch = distinct_rows(200, obj.window(128), seed=3)
    ex = obj(batch)
    masked = words = 0
    for r in range(200):
        inputs, _ = example_of(ex, r)
        assert MASK not in inputs
        missing = alignment(batch.tokens[r], inputs)
        check_whole_words(batch.tokens[r], missing)
        starts = word_starts(batch.tokens[r])
        masked, words = masked + int(starts[missing].sum()), words + int(starts.sum())
    assert abs(masked / words - 0.3) < 0.01


def test_one_mask_per_token_with_replace_length_minus_one():
    obj = objective(permute_sentences=False, replace_length=-1, poisson_lambda=5.0)
    batch = distinct_rows(50, obj.window(128), seed=4)
    ex = obj(batch)
    for r in range(50):
        inputs, targets = example_of(ex, r)
        # Inserted masks can make the input longer than the row: then the piece was shortened.
        assert np.array_equal(targets[:-1], batch.tokens[r][: targets.size - 1])
        missing = alignment(targets[:-1], inputs)
        # zero-length spans still insert a mask each
        assert (inputs == MASK).sum() >= missing.sum() > 0


def test_document_rotation():
    obj = objective(mask_ratio=0.0, permute_sentences=False, rotate_document=True)
    batch = distinct_rows(100, obj.window(64), seed=5)
    ex = obj(batch)
    shifts = []
    for r in range(100):
        inputs, targets = example_of(ex, r)
        original = batch.tokens[r]
        k = int(np.flatnonzero(original == inputs[0])[0])
        assert np.array_equal(inputs[:-1], np.roll(original, -k)) and inputs[-1] == SPECIAL.eos
        assert np.array_equal(targets[:-1], original)
        shifts.append(k)
    assert len(set(shifts)) > 40 and sum(s != 0 for s in shifts) >= 90  # about uniform over 63 shifts


def test_packed_documents_and_inserted_masks_fit():
    # Mostly zero-length spans: inserted masks make inputs longer than the piece, so the packer
    # shortens the last piece until it fits.
    rng = np.random.default_rng(6)
    obj = objective(mask_ratio=0.5, poisson_lambda=0.3, permute_sentences=False)
    seq_len = 64
    width = obj.window(seq_len)
    rows = []
    docs_of_row = []
    for _ in range(20):
        docs = [rng.choice(np.arange(FIRST, LAST), n, replace=False) for n in (*rng.integers(1, 20, 3), width)]
        tokens = np.concatenate([np.append(d, SPECIAL.eos) for d in docs])[:width]
        ids = np.concatenate([np.full(d.size + 1, i) for i, d in enumerate(docs)])[:width]
        rows.append((tokens, ids))
        docs_of_row.append(docs)
    ex = obj(Batch(np.stack([t for t, _ in rows]), np.stack([i for _, i in rows]), np.arange(20)))
    cut = 0
    assert ex.input_ids.shape == (20, seq_len) and ex.labels.shape == (20, seq_len)
    assert torch.equal(ex.loss_mask, (ex.decoder_layout.segment_ids > 0).float())
    for r in range(20):
        n_segments = int(ex.layout.segment_ids[r].max())
        assert n_segments >= 2
        for s in range(1, n_segments + 1):
            inputs, targets = example_of(ex, r, s)
            doc = docs_of_row[r][s - 1]
            assert np.array_equal(targets[:-1], doc[: targets.size - 1]) and targets[-1] == SPECIAL.eos
            assert (inputs == MASK).sum() > 0
            where = ex.decoder_layout.segment_ids[r] == s
            dec_in = ex.decoder_input_ids[r][where]
            assert dec_in[0] == SPECIAL.pad and torch.equal(dec_in[1:], ex.labels[r][where][:-1])
        cut += example_of(ex, r, n_segments)[1].size < docs_of_row[r][n_segments - 1].size + 1
    assert cut >= 10  # rows usually end on a piece shortened to fit


def test_same_sample_same_noise():
    obj = objective()
    batch = distinct_rows(4, obj.window(64), seed=7)
    a = obj(batch)
    flipped = Batch(batch.tokens[::-1].copy(), batch.doc_ids, batch.sample_ids[::-1].copy())
    assert torch.equal(a.input_ids, obj(flipped).input_ids.flip(0))
    assert not torch.equal(a.input_ids, objective(seed=4)(batch).input_ids)


def chinese_corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    hanzi = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可里后"
    words = ["model", "data", "train", "token", "the", "of", "and", "text"]
    out = []
    for _ in range(300):
        out.append("".join("".join(rng.choices(hanzi, k=rng.randint(5, 15))) + rng.choice("。！？") for _ in range(4)))
        out.append(" ".join(rng.choices(words, k=12)) + ".")
    return out


@pytest.fixture(scope="module")
def chinese_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return train_tokenizer(chinese_corpus(0), TokenizerConfig(vocab_size=500), path, progress=False)


def test_chinese_word_starts_and_noising(chinese_tokenizer):
    tok = chinese_tokenizer
    special = infer_special_tokens(tok)
    ctx = ObjectiveContext(special, tok.get_vocab_size(), 0, tok)
    classes = TokenClasses(ctx.token_strings(), special.ids())
    text = "大规模语言模型 train the model"  # mostly characters the tokenizer never merged: byte tokens
    enc = tok.encode(text)
    starts = classes.word_starts(np.array(enc.ids))
    seen: set[int] = set()
    for flag, (a, b) in zip(starts, enc.offsets, strict=True):
        first_of_char = a not in seen  # byte tokens of one character share its offsets
        seen.add(a)
        if "\u4e00" <= text[a] <= "\u9fff" or text[a] == " ":  # every token here is one of these
            assert flag == first_of_char, f"token of {text[a:b]!r}: only a character's first token starts a word"
    assert classes.full_stop[tok.encode("。").ids[-1]] and classes.full_stop[tok.encode("！").ids[-1]]

    texts = [t for t in chinese_corpus(1) if not t.isascii()][:40]
    docs = [np.array(tok.encode(t).ids) for t in texts]
    seq_len = max(d.size for d in docs) + 2
    for options, check in (({"mask_ratio": 0.0}, "sentences"), ({}, "masks")):
        obj = build_objective(BartNoisingConfig(**options), ctx)
        width = obj.window(seq_len)
        tokens = np.stack([np.pad(d, (0, width - d.size), constant_values=special.eos) for d in docs])
        ids = np.where(np.arange(width) <= np.array([d.size for d in docs])[:, None], 0, 1)
        ex = obj(Batch(tokens, ids, np.arange(len(docs))))
        masked = total = 0
        for r, text in enumerate(texts):
            inputs, targets = example_of(ex, r)
            assert tok.decode(targets.tolist()) == text
            if check == "sentences":
                shuffled = tok.decode(inputs.tolist())
                assert sorted(shuffled.replace("！", "。").replace("？", "。").split("。")) == sorted(
                    text.replace("！", "。").replace("？", "。").split("。")
                )
            else:
                masked += docs[r].size - int((inputs != special.mask).sum() - 1)
                total += docs[r].size
        if check == "masks":
            assert 0.2 < masked / total < 0.45


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("objective.mask_ratio=1.5", "objective.mask_ratio"),
        ("objective.poisson_lambda=0", "objective.poisson_lambda"),
        ("objective.replace_length=0", "objective.replace_length"),
    ],
)
def test_bad_options_name_the_key(override: str, key: str):
    base = ["model.arch=encoder_decoder", "objective.name=bart"]
    assert load_config(None, base).objective == BartNoisingConfig()
    with pytest.raises(ConfigError, match=key):
        load_config(None, [*base, override])
