"""Prefix LM and FIM on packed rows: prefix LM scores only what its position cannot see and keeps
documents apart; FIM rows parse back to the original documents, at the configured rates, without
ever cutting a character, and every row's randomness is a function of its sample id."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from lmforge.config import ConfigError, TokenizerConfig
from lmforge.models import build_model
from lmforge.models.decoder import DecoderConfig
from lmforge.objectives.base import AttentionLayout, ObjectiveContext, build_objective
from lmforge.objectives.fim import FIMConfig
from lmforge.objectives.prefix_lm import PrefixLMConfig
from lmforge.tokenizer.special_tokens import SpecialTokens, load_special_tokens
from lmforge.tokenizer.train import train_tokenizer
from lmforge.tokens.loader import Batch

WORDS = ["the", "model", "reads", "tokens", "and", "writes", "logits", "while", "a", "fox", "jumps", "café"]
CODE = ["def f(x):", "    return x + 1", "for i in range(10):", "    print(i)", "class A:", "    pass"]
HAN = "自然语言处理是人工智能的一个重要方向我们今天学习中文分词"
EMOJI = "🙂🚀🎉😀🔥"  # one code point each
# Characters the tokenizer never sees in training: each is several byte tokens, so a token-level cut
# (or a window edge) can split it.
RARE = "龍鳳麒麟饕餮魑魅魍魎🦄🐉🧬"


def english(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25))) + "."


def code(rng: random.Random) -> str:
    return "\n".join(rng.choice(CODE) for _ in range(rng.randint(1, 6)))


def chinese(rng: random.Random) -> str:
    return "".join(rng.choice(HAN + EMOJI + "，。 ") for _ in range(rng.randint(3, 30)))


def rare(rng: random.Random) -> str:
    """Text with characters left out of the tokenizer's training: each is several byte tokens."""
    return "".join(rng.choice(RARE + HAN + " ") for _ in range(rng.randint(3, 20)))


def documents(n: int, seed: int, kinds=(english, code, chinese, rare)) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(kinds)(rng) for _ in range(n)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, SpecialTokens]:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    texts = documents(600, 0, kinds=(english, code, chinese))
    tokenizer = train_tokenizer(texts, TokenizerConfig(vocab_size=600), path, progress=False)
    return tokenizer, load_special_tokens(path, tokenizer)


def ctx(tok: tuple[Tokenizer, SpecialTokens], seed: int = 0) -> ObjectiveContext:
    tokenizer, special = tok
    return ObjectiveContext(special, tokenizer.get_vocab_size(), seed, tokenizer)


def pack(tokenizer: Tokenizer, eos: int, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The token stream of packed documents, each followed by EOS, and each token's document."""
    ids, docs = [], []
    for d, text in enumerate(texts):
        piece = tokenizer.encode(text).ids + [eos]
        ids += piece
        docs += [d] * len(piece)
    return np.array(ids, dtype=np.int64), np.array(docs, dtype=np.int64)


def windows(stream: np.ndarray, docs: np.ndarray, width: int, sample_ids: list[int]) -> Batch:
    """Rows as the loader cuts them: window k starts at k*(width-1)."""
    starts = [k * (width - 1) for k in range(len(sample_ids))]
    return Batch(np.stack([stream[s : s + width] for s in starts]), np.stack([docs[s : s + width] for s in starts]),
                 np.array(sample_ids))


# ---------------------------------------------------------------- FIM


def split_at(ids: list[int], eos: int) -> list[list[int]]:
    """Fragments between EOS tokens (the last one may be cut by the row's end)."""
    out: list[list[int]] = [[]]
    for i in ids:
        if i == eos:
            out.append([])
        else:
            out[-1].append(i)
    return out


def parse(frag: list[int], tok: tuple[Tokenizer, SpecialTokens]) -> tuple[str, str, list[str]]:
    """(text, kind, pieces) of a complete output fragment: plain, PSM or SPM put back in order."""
    tokenizer, sp = tok

    def dec(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    if not frag or frag[0] != sp.fim_prefix:
        return dec(frag), "plain", [dec(frag)]
    body = frag[1:]
    for sentinel in (sp.fim_prefix, sp.fim_suffix, sp.fim_middle):
        assert body.count(sentinel) == (sentinel != sp.fim_prefix), "each sentinel exactly once"
    s, m = body.index(sp.fim_suffix), body.index(sp.fim_middle)
    assert s < m
    if s == 0:  # SPM; a PSM with an empty prefix is the same token sequence
        suffix, rest = dec(body[1:m]), dec(body[m + 1 :])
        return rest + suffix, "spm", [rest, suffix]
    prefix, suffix, middle = dec(body[:s]), dec(body[s + 1 : m]), dec(body[m + 1 :])
    return prefix + middle + suffix, "psm", [prefix, middle, suffix]


def test_fim_documents_reassemble_exactly(tok) -> None:
    """One row holding whole documents (and spare room after them, as empty documents): every
    document, transformed or not, parses back to its exact text."""
    tokenizer, sp = tok
    texts = documents(60, 1)
    stream, docs = pack(tokenizer, sp.eos, texts)
    room = 400  # empty documents at the end absorb the growth from sentinels and re-encoding
    stream = np.concatenate([stream, np.full(room, sp.eos)])
    docs = np.concatenate([docs, len(texts) + np.arange(room)])
    fim = build_objective(FIMConfig(), ctx(tok))
    row = fim.transform_row(stream, docs, sample_id=7)
    fragments = split_at(row.tolist(), sp.eos)
    kinds = []
    for text, frag in zip(texts, fragments, strict=False):
        got, kind, _ = parse(frag, tok)
        assert got == text
        kinds.append(kind)
    assert len(fragments) > len(texts) and {"plain", "psm", "spm"} <= set(kinds)
    assert set(row[-50:].tolist()) == {sp.eos}, "only empty documents were pushed out"


def test_fim_cut_row_is_the_start_of_the_uncut_one(tok) -> None:
    """Cutting the source row after a document cuts the transformed row at the same length: what the
    row's end drops is the tail of the same transformation, never a different one."""
    tokenizer, sp = tok
    stream, docs = pack(tokenizer, sp.eos, documents(30, 2))
    fim = build_objective(FIMConfig(), ctx(tok))
    full = fim.transform_row(stream, docs, sample_id=3)
    for cut in np.flatnonzero(stream == sp.eos)[::3] + 1:
        short = fim.transform_row(stream[:cut], docs[:cut], sample_id=3)
        real = short != sp.fim_pad
        n = int(real.sum())
        assert real[:n].all(), "padding only at the end"
        assert np.array_equal(short[:n], full[:n])


def test_fim_rates_and_reassembly_in_packed_windows(tok) -> None:
    tokenizer, sp = tok
    stream, docs = pack(tokenizer, sp.eos, documents(3000, 3))
    width, n_rows = 129, 300
    batch = windows(stream, docs, width, list(range(1000, 1000 + n_rows)))
    ex = build_objective(FIMConfig(), ctx(tok))(batch)
    assert ex.input_ids.shape == (n_rows, width - 1) and ex.layout.is_plain_causal
    assert torch.equal(ex.loss_mask, (ex.labels != sp.fim_pad).float())
    eligible = fim_count = unclean = 0
    orders = set()
    for raw, out in zip(batch.tokens, torch.cat([ex.input_ids, ex.labels[:, -1:]], 1), strict=True):
        sources, outputs = split_at(raw.tolist(), sp.eos), split_at(out.tolist(), sp.eos)
        padded = sp.fim_pad in out.tolist()  # nothing was cut off: every fragment is whole
        for k, (src, frag) in enumerate(zip(sources, outputs, strict=False)):
            complete = k < len(outputs) - 1 or padded
            src_text = tokenizer.decode(src, skip_special_tokens=False)
            if not frag:
                continue
            transformed = frag[0] == sp.fim_prefix
            if src and "\ufffd" not in src_text:
                eligible += 1
                fim_count += transformed
                if transformed and len(frag) > 1:  # the row's end may leave only <fim_prefix>
                    orders.add(frag[1] == sp.fim_suffix)
            else:
                unclean += bool(src)
                assert not transformed, "a fragment that does not decode cleanly stays as it is"
            if complete:
                frag = [i for i in frag if i != sp.fim_pad]
                assert parse(frag, tok)[0] == src_text
                if not transformed:
                    assert frag == src
    assert eligible > 1000 and unclean > 10  # windows do cut characters
    assert abs(fim_count / eligible - 0.5) < 0.05
    assert orders == {True, False}, "both PSM and SPM"


def test_fim_spm_share(tok) -> None:
    """Long documents, all transformed: SPM rows start <fim_prefix><fim_suffix>, and so does a PSM row
    whose prefix is empty (the same tokens), which at ~120 characters adds under 1% to the share."""
    tokenizer, sp = tok
    rng = random.Random(6)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 25))) for _ in range(1500)]
    stream, docs = pack(tokenizer, sp.eos, texts)
    fim = build_objective(FIMConfig(fim_rate=1.0), ctx(tok))
    fragments = split_at(fim.transform_row(stream, docs, sample_id=0).tolist(), sp.eos)
    starts = [f[:2] for f in fragments if len(f) > 1]
    assert len(starts) > 1000 and all(s[0] == sp.fim_prefix for s in starts)
    share = sum(s[1] == sp.fim_suffix for s in starts) / len(starts)
    assert abs(share - 0.5) < 0.05, share


CHARS = st.sampled_from(list(RARE + HAN + EMOJI + "ab ,.\n"))


@settings(max_examples=60, deadline=None)
@given(text=st.text(CHARS, min_size=1, max_size=40), spm=st.booleans(), sample_id=st.integers(0, 10**9))
def test_fim_never_cuts_inside_a_character(tok, text: str, spm: bool, sample_id: int) -> None:
    """Chinese and emoji take 3-4 bytes and, when rare, several byte-level tokens: a token-level cut
    would leave a piece that decodes to U+FFFD. Each piece must decode to clean text on its own."""
    tokenizer, sp = tok
    assert all(len(tokenizer.encode(c).ids) > 1 for c in RARE)
    stream, docs = pack(tokenizer, sp.eos, [text, "", "", "", ""])
    stream = np.concatenate([stream, np.full(len(stream) + 8, sp.eos)])
    docs = np.concatenate([docs, 5 + np.arange(len(docs) + 8)])
    fim = build_objective(FIMConfig(fim_rate=1.0, spm_rate=float(spm)), ctx(tok))
    frag = split_at(fim.transform_row(stream, docs, sample_id).tolist(), sp.eos)[0]
    got, kind, pieces = parse(frag, tok)
    assert got == text
    assert kind == ("spm" if spm else "psm") or (kind == "spm" and pieces[0] + pieces[-1] == text)
    assert all("\ufffd" not in piece for piece in pieces)


def test_fim_randomness_follows_the_sample_id(tok) -> None:
    tokenizer, sp = tok
    stream, docs = pack(tokenizer, sp.eos, documents(400, 4))
    batch = windows(stream, docs, 65, [11, 12, 13, 14, 15, 16])
    fim = build_objective(FIMConfig(), ctx(tok))
    order = [4, 0, 5, 2, 1, 3]
    shuffled = Batch(batch.tokens[order], batch.doc_ids[order], batch.sample_ids[order])
    a, b = fim(batch), fim(shuffled)
    assert torch.equal(a.input_ids[order], b.input_ids) and torch.equal(a.loss_mask[order], b.loss_mask)
    other_ids = Batch(batch.tokens, batch.doc_ids, batch.sample_ids + 100)
    assert not torch.equal(fim(other_ids).input_ids, a.input_ids)
    assert not torch.equal(build_objective(FIMConfig(), ctx(tok, seed=1))(batch).input_ids, a.input_ids)


def test_fim_options_and_requirements(tok) -> None:
    with pytest.raises(ConfigError, match="objective.fim_rate"):
        FIMConfig(fim_rate=1.5).validate("objective")
    with pytest.raises(ConfigError, match="objective.spm_rate"):
        FIMConfig(spm_rate=-0.1).validate("objective")
    special = tok[1]
    with pytest.raises(ValueError, match="tokenizer"):
        build_objective(FIMConfig(), ObjectiveContext(special, 600))
    with pytest.raises(ValueError, match="fim_prefix"):
        build_objective(FIMConfig(), ObjectiveContext(SpecialTokens(eos=0), 600, 0, tok[0]))


def test_fim_rate_zero_is_plain_lm(tok) -> None:
    tokenizer, sp = tok
    stream, docs = pack(tokenizer, sp.eos, documents(100, 5))
    batch = windows(stream, docs, 33, [1, 2, 3])
    ex = build_objective(FIMConfig(fim_rate=0.0), ctx(tok))(batch)
    t = torch.from_numpy(batch.tokens)
    assert torch.equal(ex.input_ids, t[:, :-1]) and torch.equal(ex.labels, t[:, 1:]) and ex.loss_mask.all()


# ---------------------------------------------------------------- prefix LM

EOS, VOCAB = 0, 64


def synthetic_batch(n_rows: int, width: int, seed: int, max_doc: int = 12) -> Batch:
    """Packed rows of random documents (lengths 0..max_doc, each followed by EOS); no tokenizer needed."""
    rng = np.random.default_rng(seed)
    ids, docs = [], []
    d = 0
    while len(ids) < n_rows * width:
        n = int(rng.integers(0, max_doc + 1))
        ids += rng.integers(1, VOCAB, n).tolist() + [EOS]
        docs += [d] * (n + 1)
        d += 1
    return windows(np.array(ids), np.array(docs), width, list(range(seed, seed + n_rows)))


def prefix_lm(seed: int = 0):
    return build_objective(PrefixLMConfig(), ObjectiveContext(SpecialTokens(eos=EOS), VOCAB, seed))


def runs(row: list[int]) -> list[tuple[int, int]]:
    bounds = [0] + [i for i in range(1, len(row)) if row[i] != row[i - 1]] + [len(row)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def test_prefix_lm_scores_only_after_the_split_inside_each_document() -> None:
    batch = synthetic_batch(40, 49, seed=1)
    ex = prefix_lm()(batch)
    tokens = torch.from_numpy(batch.tokens)
    assert torch.equal(ex.input_ids, tokens[:, :-1]) and torch.equal(ex.labels, tokens[:, 1:])
    for r in range(len(tokens)):
        seg, prefix, loss = ex.layout.segment_ids[r].tolist(), ex.layout.prefix[r].tolist(), ex.loss_mask[r].tolist()
        ids, doc = batch.tokens[r], batch.doc_ids[r]
        for start, stop in runs(seg):
            assert ex.position_ids[r, start:stop].tolist() == list(range(stop - start))
            # A segment starts at the row's start or at the EOS closing the previous document.
            assert start == 0 or ids[start] == EOS
            assert EOS not in ids[start + 1 : stop].tolist()
            split = start + sum(prefix[start:stop])
            assert prefix[start:stop] == [True] * (split - start) + [False] * (stop - split)
            if stop - start == 1:
                assert loss[start] == 0 and not prefix[start]
                continue
            assert start < split < stop
            # Position t predicts t+1: scored exactly when t+1 lies after the split ...
            assert loss[start:stop] == [0.0] * (split - 1 - start) + [1.0] * (stop - split + 1)
            # ... and every scored target belongs to this segment's document.
            owner = doc[start] + (ids[start] == EOS)
            assert all(doc[t + 1] == owner for t in range(split - 1, stop))


def test_prefix_lm_split_is_uniform() -> None:
    """Documents of exactly 9 tokens make every inner piece 10 long (EOS + 9): splits 1..9 equally."""
    rng = np.random.default_rng(0)
    ids = np.concatenate([np.append(rng.integers(1, VOCAB, 9), EOS) for _ in range(3000)])
    docs = np.repeat(np.arange(3000), 10)
    batch = windows(ids, docs, 61, list(range(450)))
    ex = prefix_lm()(batch)
    counts = np.zeros(10, dtype=int)
    for r in range(len(batch.tokens)):
        seg = ex.layout.segment_ids[r].tolist()
        for start, stop in runs(seg)[1:-1]:  # whole pieces only
            assert stop - start == 10
            counts[int(ex.layout.prefix[r, start:stop].sum())] += 1
    assert counts[0] == 0
    expected = counts.sum() / 9
    assert np.all(np.abs(counts[1:] - expected) < 0.2 * expected), counts


def copies(t: torch.Tensor, row: int) -> torch.Tensor:
    return t[row].expand(t.shape[1] + 1, -1)


def test_prefix_lm_no_leak_of_targets_or_across_documents() -> None:
    """With a real decoder: perturbing a token changes a scored position's logits only if it is in
    the same document and not after it (so never its own target); the prefix is seen both ways."""
    torch.manual_seed(0)
    model = build_model(DecoderConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                                      init_std=0.1)).eval()
    batch = synthetic_batch(3, 25, seed=5, max_doc=9)
    ex = prefix_lm()(batch)
    T = ex.input_ids.shape[1]
    for r in range(3):
        ids = ex.input_ids[r].repeat(T + 1, 1)
        ids[1 + torch.arange(T), torch.arange(T)] = ids[0] % (VOCAB - 1) + 1
        layout = AttentionLayout(True, copies(ex.layout.segment_ids, r), copies(ex.layout.prefix, r))
        with torch.no_grad():
            out = model(ids, layout, copies(ex.position_ids, r))
        hit = ((out[1:] - out[0]).abs().amax(-1) > 1e-6).T  # [position t, perturbed j]
        seg, prefix = ex.layout.segment_ids[r].tolist(), ex.layout.prefix[r].tolist()
        for t in range(T):
            # One attention step of this rule is closed under composition, so it holds for 2 layers.
            want = [seg[t] == seg[j] and (j <= t or (prefix[t] and prefix[j])) for j in range(T)]
            assert hit[t].tolist() == want, f"row {r}, position {t}"
            if ex.loss_mask[r, t] and t + 1 < T:
                assert not hit[t, t + 1], "a scored position sees its own target"
        assert ex.loss_mask[r].sum() > 0 and any(prefix[t] and prefix[t + 1] for t in range(T - 1))


def test_prefix_lm_randomness_follows_the_sample_id() -> None:
    batch = synthetic_batch(6, 33, seed=2)
    order = [3, 1, 5, 0, 2, 4]
    shuffled = Batch(batch.tokens[order], batch.doc_ids[order], batch.sample_ids[order])
    a, b = prefix_lm()(batch), prefix_lm()(shuffled)
    assert torch.equal(a.layout.prefix[order], b.layout.prefix) and torch.equal(a.loss_mask[order], b.loss_mask)
    assert not torch.equal(prefix_lm(seed=1)(batch).layout.prefix, a.layout.prefix)


def test_prefix_lm_pairs_with_decoders_only() -> None:
    assert PrefixLMConfig.families == ("decoder",) and FIMConfig.families == ("decoder",)
    assert prefix_lm().window(128) == 129


def test_tokenizer_fixture_is_byte_level(tok) -> None:
    """The reassembly tests rely on decode(encode(text)) == text for any text."""
    tokenizer, _ = tok
    for text in documents(50, 9) + ["  x\t\n", "🙂🙂", "日本語"]:
        assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text
