"""The MLM(+NSP) objective: masking statistics, special tokens, whole words (Chinese included),
sentence pairs and their labels, the [CLS] A [SEP] B [SEP] layout, and batch independence."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers

from lmforge.config import ConfigError, TokenizerConfig
from lmforge.objectives.base import Example, ObjectiveContext
from lmforge.objectives.mlm import MaskedLM, MLMConfig, byte_level_alphabet, token_bytes
from lmforge.tokenizer.special_tokens import SPECIAL_TOKENS, infer_special_tokens, load_special_tokens
from lmforge.tokenizer.train import train_tokenizer
from lmforge.tokens.loader import Batch

# ------------------------------------------------------------------ a vocabulary of known words


def byte_level(text: str) -> str:
    """The byte-level BPE spelling of `text` (transformers' and tokenizers' own mapping)."""
    return "".join(piece for piece, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text))


ZHONG = byte_level("中")  # three bytes; also split below into a lead piece and a continuation piece
# Each word as its token strings: words start with a space, a newline or a Chinese character.
WORDS = [
    ["Ġred"], ["Ġblu", "e"], ["Ġgre", "e", "n"], ["Ġcat", "s"], ["Ġend", "."], ["Ġwhy", "?"], ["Ċ"],
    [ZHONG], [ZHONG[:2], ZHONG[2:]], [byte_level("文")], [byte_level("。")],
]
MARKERS = [f"Ġd{k}" for k in range(100)]  # one word per document, so a token tells its document
STRINGS = list(SPECIAL_TOKENS) + sorted({t for w in WORDS for t in w}) + MARKERS
WORD_IDS = [[STRINGS.index(t) for t in w] for w in WORDS]
SYN_VOCAB = len(STRINGS)
SYN_TOKENIZER = Tokenizer(models.WordLevel({t: i for i, t in enumerate(STRINGS)}, unk_token="<|pad|>"))
SYN_SPECIAL = infer_special_tokens(SYN_TOKENIZER)
EOS, PAD, MASK, CLS, SEP = SYN_SPECIAL.eos, SYN_SPECIAL.pad, SYN_SPECIAL.mask, SYN_SPECIAL.cls, SYN_SPECIAL.sep
SPECIAL_IDS = np.array(sorted(SYN_SPECIAL.ids()))


def objective(special=SYN_SPECIAL, tokenizer=SYN_TOKENIZER, seed: int = 0, **cfg: object) -> MaskedLM:
    vocab = tokenizer.get_vocab_size()
    return MaskedLM(MLMConfig(**cfg), ObjectiveContext(special, vocab, seed=seed, tokenizer=tokenizer))


def stream(docs: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tokens, doc ids and word numbers of documents given as word indices, packed with EOS after
    each document (EOS gets word number -1)."""
    tokens, doc_ids, word_no = [], [], []
    n = 0
    for d, words in enumerate(docs):
        for w in words:
            tokens += WORD_IDS[w]
            doc_ids += [d] * len(WORD_IDS[w])
            word_no += [n] * len(WORD_IDS[w])
            n += 1
        tokens.append(EOS)
        doc_ids.append(d)
        word_no.append(-1)
    return np.array(tokens), np.array(doc_ids), np.array(word_no)


def rows(array: np.ndarray, B: int, T: int) -> np.ndarray:
    return array[: B * T].reshape(B, T)


docs_strategy = st.lists(st.lists(st.integers(0, len(WORDS) - 1), min_size=1, max_size=30), min_size=1, max_size=12)


def batch_of(docs: list[list[int]], B: int, T: int) -> tuple[Batch, np.ndarray]:
    """B rows of T tokens cut from the packed documents (repeated as needed), and word numbers."""
    reps = -(-B * T // stream(docs)[0].size)
    tokens, doc_ids, word_no = stream(docs * reps)
    return Batch(rows(tokens, B, T), rows(doc_ids, B, T), np.arange(B)), rows(word_no, B, T)


def check_structure(ex: Example, nsp: bool) -> None:
    """[CLS] A [SEP] (B [SEP]) then padding; segment ids, token types, labels and loss mask agree."""
    labels, inputs = ex.labels.numpy(), ex.input_ids.numpy()
    chosen = ex.loss_mask.numpy() == 1
    seg, types = ex.layout.segment_ids.numpy(), ex.token_type_ids.numpy()
    assert not ex.layout.causal and ex.position_ids is None
    for r in range(labels.shape[0]):
        n = int(seg[r].sum())
        assert (seg[r, :n] == 1).all() and (seg[r, n:] == 0).all()
        assert labels[r, 0] == CLS and labels[r, n - 1] == SEP and (labels[r, n:] == PAD).all()
        seps = np.flatnonzero(labels[r, :n] == SEP)
        assert len(seps) == (2 if nsp else 1)
        expected_types = np.zeros(labels.shape[1], dtype=np.int64)
        if nsp:
            expected_types[seps[0] + 1 : n] = 1
        assert (types[r] == expected_types).all()
    # Restoring the chosen positions gives the labels back; nothing else is touched.
    assert (np.where(chosen, labels, inputs) == labels).all()
    # Special tokens are never chosen, and a random replacement never draws one.
    assert not np.isin(labels[chosen], SPECIAL_IDS).any()
    replaced = inputs[chosen]
    assert not np.isin(replaced[replaced != MASK], SPECIAL_IDS).any()
    assert (ex.nsp_labels is not None) == nsp


def occurs(needle: np.ndarray, haystack: np.ndarray) -> bool:
    n = needle.size
    return n == 0 or any((haystack[i : i + n] == needle).all() for i in range(haystack.size - n + 1))


# ------------------------------------------------------------------ property tests


@settings(max_examples=40, deadline=None)
@given(docs=docs_strategy, B=st.integers(1, 5), T=st.integers(4, 40), seed=st.integers(0, 2**16),
       whole_word=st.booleans(), short=st.sampled_from([0.0, 0.5]))
def test_plain_rows_are_contiguous_text(docs, B: int, T: int, seed: int, whole_word: bool, short: float) -> None:
    """nsp=False: [CLS] the row's first tokens [SEP]; inputs with labels restored equal the source."""
    batch, _ = batch_of(docs, B, T)
    ex = objective(nsp=False, whole_word=whole_word, short_seq_prob=short, seed=seed)(batch)
    check_structure(ex, nsp=False)
    for r in range(B):
        n = int(ex.layout.segment_ids[r].sum()) - 2
        assert n >= min(2, T - 2)
        assert (ex.labels[r, 1 : n + 1].numpy() == batch.tokens[r, :n]).all()


@settings(max_examples=40, deadline=None)
@given(docs=docs_strategy, B=st.integers(1, 5), T=st.integers(5, 40), seed=st.integers(0, 2**16),
       whole_word=st.booleans())
def test_sentence_pairs_come_from_the_source(docs, B: int, T: int, seed: int, whole_word: bool) -> None:
    """nsp=True: A is contiguous text of its own row; B continues A's row (IsNext) or is contiguous
    text of another document in the batch (NotNext)."""
    batch, _ = batch_of(docs, B, T)
    ex = objective(nsp=True, whole_word=whole_word, seed=seed)(batch)
    check_structure(ex, nsp=True)
    for r in range(B):
        labels = ex.labels[r].numpy()
        seps = np.flatnonzero(labels == SEP)
        a, b = labels[1 : seps[0]], labels[seps[0] + 1 : seps[1]]
        own = batch.tokens[r][batch.tokens[r] != EOS]
        assert occurs(a, own)
        if ex.nsp_labels[r] == 0:
            assert occurs(b, own)
        else:
            assert any(occurs(b, batch.tokens[j]) for j in range(B) if j != r)
            assert b.size > 0


@settings(max_examples=30, deadline=None)
@given(docs=docs_strategy, T=st.integers(4, 40), seed=st.integers(0, 2**16), whole_word=st.booleans(),
       data=st.data())
def test_same_sample_same_example_in_any_batch(docs, T: int, seed: int, whole_word: bool, data) -> None:
    """nsp=False: a row's example depends on its tokens and sample id only, not on its batch."""
    batch, _ = batch_of(docs, 6, T)
    order = data.draw(st.permutations(range(6)))
    size = data.draw(st.integers(1, 6))
    sub = Batch(batch.tokens[order][:size], batch.doc_ids[order][:size], batch.sample_ids[order][:size])
    obj = objective(nsp=False, whole_word=whole_word, seed=seed)
    full, part = obj(batch), obj(sub)
    for k, r in enumerate(order[:size]):
        for name in ("input_ids", "labels", "loss_mask", "token_type_ids"):
            assert (getattr(full, name)[r] == getattr(part, name)[k]).all(), name
        assert (full.layout.segment_ids[r] == part.layout.segment_ids[k]).all()


@settings(max_examples=40, deadline=None)
@given(docs=docs_strategy, B=st.integers(1, 4), T=st.integers(4, 40), seed=st.integers(0, 2**16))
def test_whole_word_masking_takes_whole_words(docs, B: int, T: int, seed: int) -> None:
    """Every word (as generated: English pieces, a Chinese character even when split in two tokens)
    is chosen entirely or not at all."""
    batch, word_no = batch_of(docs, B, T)
    obj = objective(nsp=False, whole_word=True, short_seq_prob=0.0, mask_rate=0.4, seed=seed)
    ex = obj(batch)
    chosen = ex.loss_mask.numpy()[:, 1 : T - 1] == 1
    words = word_no[:, : T - 2]
    for r in range(B):
        for w in np.unique(words[r][words[r] >= 0]):
            flags = chosen[r][words[r] == w]
            assert flags.all() or not flags.any(), (r, w)
        # The boundaries found are exactly the generated ones (no word glued to the next).
        real = words[r] >= 0
        truth = real & (np.arange(T - 2) == 0) | (words[r] != np.concatenate(([-2], words[r][:-1])))
        found = obj.facts.word_starts(ex.labels[r].numpy())[1 : T - 1]
        assert (found[real] == truth[real]).all()


# ------------------------------------------------------------------ statistics on real text

ENGLISH = ["The cat sat on the mat.", "Dogs bark loudly at night!", "Is this the real life?",
           "Models read tokens and write logits.", "def f(x):\n    return x + 1\n"]
CHINESE = ["我们今天去公园散步。", "天气很好！", "你吃饭了吗？", "机器学习模型读取文本。", "北京是中国的首都。"]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, object]:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(ENGLISH + CHINESE) for _ in range(8)) for _ in range(300)]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer = train_tokenizer(texts, TokenizerConfig(vocab_size=600), path, progress=False)
    return tokenizer, load_special_tokens(path, tokenizer)


def corpus_batch(tokenizer: Tokenizer, eos: int, B: int, T: int, sentences: list[str], seed: int = 0,
                 doc_sentences: tuple[int, int] = (3, 10)) -> Batch:
    """B rows of T tokens from random documents of `doc_sentences` sentences, packed with EOS."""
    rng = random.Random(seed)
    tokens: list[int] = []
    doc_ids: list[int] = []
    d = 0
    while len(tokens) < B * T:
        text = " ".join(rng.choice(sentences) for _ in range(rng.randint(*doc_sentences)))
        ids = tokenizer.encode(text).ids + [eos]
        tokens += ids
        doc_ids += [d] * len(ids)
        d += 1
    return Batch(rows(np.array(tokens), B, T), rows(np.array(doc_ids), B, T), np.arange(B) + seed * B)


def test_byte_level_alphabet_matches_tokenizers(bpe) -> None:
    tokenizer, special = bpe
    assert set(byte_level_alphabet()) == set(pre_tokenizers.ByteLevel.alphabet())
    text = "Hello, wörld!\n\t机器学习。 ✓"
    strings = [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]
    data = token_bytes(strings, np.zeros(len(strings), dtype=bool))
    assert b"".join(data[i].tobytes() for i in tokenizer.encode(text).ids) == text.encode("utf-8")


@pytest.mark.parametrize("nsp", [True, False], ids=["nsp", "plain"])
def test_masking_rate_and_80_10_10_split(bpe, nsp: bool) -> None:
    """Over >33k maskable tokens: 15% chosen; of those 80% [MASK], 10% random, 10% unchanged (each
    tolerance is 4 standard deviations or more)."""
    tokenizer, special = bpe
    obj = objective(special, tokenizer, nsp=nsp)
    normal = tokenizer.get_vocab_size() - len(special.ids())
    candidates = chosen = masked = random_ = kept = 0
    for seed in range(6):
        # Long documents: an NSP row holds one document (plus a random B), so short ones leave padding.
        ex = obj(corpus_batch(tokenizer, special.eos, 64, 128, ENGLISH + CHINESE, seed, doc_sentences=(20, 40)))
        labels, inputs, mask = ex.labels.numpy(), ex.input_ids.numpy(), ex.loss_mask.numpy() == 1
        candidates += int((~np.isin(labels, list(special.ids()))).sum())
        chosen += int(mask.sum())
        masked += int((inputs[mask] == special.mask).sum())
        kept += int((inputs[mask] == labels[mask]).sum())
        random_ += int(((inputs[mask] != special.mask) & (inputs[mask] != labels[mask])).sum())
        drawn = inputs[mask][inputs[mask] != special.mask]
        assert not np.isin(drawn, list(special.ids())).any()  # random tokens are never special
    assert candidates > 33_000
    assert abs(chosen / candidates - 0.15) < 0.01
    assert abs(masked / chosen - 0.8) < 0.025
    # A random draw equals the original token 1 time in `normal`: it then counts as kept.
    assert abs(random_ / chosen - 0.1 * (1 - 1 / normal)) < 0.02
    assert abs(kept / chosen - 0.1 * (1 + 1 / normal)) < 0.02


def test_whole_word_rate_counts_words(bpe) -> None:
    """Whole-word masking still chooses about 15% of the maskable tokens (words are drawn uniformly)."""
    tokenizer, special = bpe
    obj = objective(special, tokenizer, nsp=False, whole_word=True, short_seq_prob=0.0)
    candidates = chosen = 0
    for seed in range(3):
        ex = obj(corpus_batch(tokenizer, special.eos, 64, 128, ENGLISH + CHINESE, seed))
        candidates += int((~np.isin(ex.labels.numpy(), list(special.ids()))).sum())
        chosen += int(ex.loss_mask.sum())
    assert abs(chosen / candidates - 0.15) < 0.015


def marker_batch(B: int, T: int, seed: int) -> Batch:
    """Documents of 2-6 sentences, each sentence 1-5 copies of the document's own marker word and
    a full stop; consecutive documents have different markers."""
    rng = random.Random(seed)
    full_stop = STRINGS.index(".")
    tokens: list[int] = []
    doc_ids: list[int] = []
    d = 0
    while len(tokens) < B * T:
        marker = STRINGS.index(MARKERS[d % len(MARKERS)])
        doc = [t for _ in range(rng.randint(2, 6)) for t in [marker] * rng.randint(1, 5) + [full_stop]] + [EOS]
        tokens += doc
        doc_ids += [d] * len(doc)
        d += 1
    return Batch(rows(np.array(tokens), B, T), rows(np.array(doc_ids), B, T), np.arange(B) + seed * B)


def test_nsp_labels_are_balanced_and_random_b_is_another_document() -> None:
    """About half the pairs are NotNext; an IsNext B is A's own document, a NotNext B another one."""
    obj = objective(nsp=True, mask_rate=0.01)
    markers = np.array([STRINGS.index(m) for m in MARKERS])
    labels, checked = [], 0
    for seed in range(8):
        ex = obj(marker_batch(32, 32, seed))
        for r in range(32):
            row = ex.labels[r].numpy()
            seps = np.flatnonzero(row == SEP)
            a, b = row[1 : seps[0]], row[seps[0] + 1 : seps[1]]
            a_doc, b_doc = set(a[np.isin(a, markers)]), set(b[np.isin(b, markers)])
            assert len(a_doc) <= 1 and len(b_doc) <= 1  # each segment lies in one document
            if a_doc and b_doc:  # (a segment may be a bare full stop)
                assert (b_doc == a_doc) == (ex.nsp_labels[r] == 0)
                checked += 1
        labels += ex.nsp_labels.tolist()
    assert checked > 200
    assert abs(np.mean(labels) - 0.5) < 0.06


def test_layout_on_real_text(bpe) -> None:
    tokenizer, special = bpe
    batch = corpus_batch(tokenizer, special.eos, 16, 48, ENGLISH + CHINESE)
    ex = objective(special, tokenizer, nsp=True, seed=3)(batch)
    labels, types = ex.labels[0].tolist(), ex.token_type_ids[0].tolist()
    first_sep, last_sep = labels.index(special.sep), len(labels) - 1 - labels[::-1].index(special.sep)
    assert labels[0] == special.cls
    assert types[: first_sep + 1] == [0] * (first_sep + 1)
    assert types[first_sep + 1 : last_sep + 1] == [1] * (last_sep - first_sep)
    assert set(types[last_sep + 1 :]) <= {0} and set(labels[last_sep + 1 :]) <= {special.pad}
    assert special.eos not in labels  # document separators are not sentence text


def test_sentences_split_after_terminators_in_both_languages(bpe) -> None:
    tokenizer, special = bpe
    obj = objective(special, tokenizer, nsp=True)
    text = "我们今天去公园散步。天气很好！你吃饭了吗？The cat sat. Dogs bark! Is this real? tail\nmore"
    ids = np.array(tokenizer.encode(text).ids)
    pieces = [tokenizer.decode(s.tolist()) for _, s in obj._sentences(ids, np.zeros_like(ids))]
    assert "".join(pieces) == text
    assert [p.strip() for p in pieces] == ["我们今天去公园散步。", "天气很好！", "你吃饭了吗？", "The cat sat.",
                                            "Dogs bark!", "Is this real?", "tail", "more"]


def word_start_offsets(text: str) -> set[int]:
    """Byte offsets where a word starts, by characters: at whitespace, after a newline, at each
    Chinese character or full-width punctuation mark, and right after one."""

    def chinese(c: str) -> bool:
        return "\u4e00" <= c <= "\u9fff" or "\u3000" <= c <= "\u303f" or "\uff00" <= c <= "\uffef"

    offsets, pos, prev = set(), 0, "\n"
    for c in text:
        if c.isspace() or prev == "\n" or chinese(c) or chinese(prev):
            offsets.add(pos)
        pos += len(c.encode("utf-8"))
        prev = c
    return offsets


def test_chinese_characters_are_words(bpe) -> None:
    """A word starts exactly at the first token of each Chinese character, at the first token after
    one, and at a space: a token is never split from the others of its character."""
    tokenizer, special = bpe
    obj = objective(special, tokenizer, nsp=False, whole_word=True)
    # Some characters were never seen in training: their bytes take several tokens.
    text = "我们用GPT模型，2024年去北京散步。Hello world!\n宇宙的边缘在哪里？new line"
    row = np.array([special.cls, *tokenizer.encode(text).ids, special.sep])
    starts = obj.facts.word_starts(row)[1:-1]
    token_offsets = np.cumsum([0] + [obj.facts.lens[t] for t in row[1:-1]])[:-1]
    assert (starts == np.isin(token_offsets, sorted(word_start_offsets(text)))).all()
    assert not starts.all()


def test_whole_word_on_chinese_never_splits_a_character(bpe) -> None:
    tokenizer, special = bpe
    obj = objective(special, tokenizer, nsp=True, whole_word=True, mask_rate=0.3)
    batch = corpus_batch(tokenizer, special.eos, 32, 64, CHINESE + ["宇宙的边缘在哪里？"])
    ex = obj(batch)
    runs = 0
    for r in range(32):
        labels, chosen = ex.labels[r].numpy(), ex.loss_mask[r].numpy() == 1
        bounds = np.flatnonzero(np.diff(np.concatenate(([0], chosen.astype(int), [0]))))
        for start, stop in zip(bounds[::2], bounds[1::2], strict=True):
            if obj.special[labels[start - 1]] or obj.special[labels[stop]]:
                continue  # beside [CLS]/[SEP]: the segment itself may have been cut mid-character
            run = b"".join(obj.facts.data[t].tobytes() for t in labels[start:stop])
            run.decode("utf-8")  # raises if a character was cut
            runs += 1
    assert runs > 50


def test_short_and_empty_rows_are_padded_not_a_crash() -> None:
    tokens = np.array([[EOS] * 6, [WORD_IDS[0][0], EOS, EOS, EOS, EOS, EOS], [WORD_IDS[4][0], *WORD_IDS[4], EOS, EOS,
                                                                                 EOS]])
    batch = Batch(tokens, np.array([[0] * 6, [1] * 6, [2, 2, 2, 2, 2, 2]]), np.arange(3))
    for nsp in (True, False):
        obj = objective(nsp=nsp)
        ex = obj(batch)
        check_structure(ex, nsp=nsp)
        if nsp:
            assert obj.skipped == 1  # the all-EOS row has nothing to mask
            assert ex.labels[0].tolist()[:3] == [CLS, SEP, SEP]
    with pytest.raises(ValueError, match="seq_len > 3"):
        objective(nsp=True).window(3)
    assert objective(nsp=False).window(3) == 3


def test_options_are_validated_and_paired_with_encoders() -> None:
    assert MLMConfig.families == ("encoder",)
    with pytest.raises(ConfigError, match="objective.mask_rate"):
        MLMConfig(mask_rate=0.0).validate("objective")
    with pytest.raises(ConfigError, match="objective.random_token_prob"):
        MLMConfig(mask_token_prob=0.95, random_token_prob=0.1).validate("objective")
    with pytest.raises(ConfigError, match="objective.short_seq_prob"):
        MLMConfig(short_seq_prob=1.5).validate("objective")


def test_tokenizer_needed_only_for_sentences_and_words() -> None:
    ctx = ObjectiveContext(SYN_SPECIAL, SYN_VOCAB, seed=0)
    MaskedLM(MLMConfig(nsp=False), ctx)  # plain MLM reads no token strings
    with pytest.raises(ValueError, match="needs the tokenizer"):
        MaskedLM(MLMConfig(nsp=True), ctx)


def test_needs_mask_cls_sep_roles() -> None:
    vocab = {"<|endoftext|>": 0, "Ġa": 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    with pytest.raises(ValueError, match="needs a 'cls' special token"):
        objective(infer_special_tokens(tokenizer), tokenizer)
