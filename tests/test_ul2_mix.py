"""UL2's mixture of denoisers and the `mix` objective: measured per-denoiser statistics, mode tokens,
realised weights, stacking of different objectives, determinism per sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models

from lmforge.config import ConfigError
from lmforge.objectives import AttentionLayout, Batch, Example, ObjectiveContext, build_objective
from lmforge.objectives.denoising import BartNoisingConfig
from lmforge.objectives.mix import MixComponent, MixConfig, stack_examples
from lmforge.objectives.span_corruption import SpanCorruptionConfig
from lmforge.objectives.ul2 import Denoiser, UL2Config, paper_denoisers
from lmforge.recipe import load_config
from lmforge.tokenizer.special_tokens import (
    NLG_ID,
    NLU_ID,
    S2S_ID,
    SPECIAL_TOKENS,
    SpecialTokens,
)

VOCAB = 1000
SENTINELS = tuple(range(VOCAB - 1, VOCAB - 101, -1))
SPECIAL = SpecialTokens(eos=0, pad=1, bos=2, mask=3, nlu=NLU_ID, nlg=NLG_ID, s2s=S2S_ID, sentinels=SENTINELS)
FIRST, LAST = 13, VOCAB - 100
MODE = {"R": NLU_ID, "S": S2S_ID, "X": NLG_ID}


def tokenizer() -> Tokenizer:
    """Even ids start words, odd ids continue them (BART reads word starts from token strings)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"Ġw{i}" if i % 2 == 0 else f"x{i}": i for i in range(FIRST, LAST)})
    vocab.update({f"<extra_id_{k}>": s for k, s in enumerate(SENTINELS)})
    return Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS[1]))


CTX = ObjectiveContext(SPECIAL, VOCAB, 11, tokenizer())


def one_doc_rows(n_rows: int, width: int, seed: int = 0, first_id: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(FIRST, LAST, (n_rows, width))
    return Batch(tokens, np.zeros_like(tokens), np.arange(first_id, first_id + n_rows, dtype=np.int64))


def segment(ex: Example, r: int, s: int = 1) -> tuple[np.ndarray, np.ndarray]:
    enc, dec = ex.layout.segment_ids[r].numpy(), ex.decoder_layout.segment_ids[r].numpy()
    return ex.input_ids[r].numpy()[enc == s], ex.labels[r].numpy()[dec == s]


def measure(inputs: np.ndarray, targets: np.ndarray, sentinels: tuple[int, ...] = SENTINELS) -> tuple:
    """(mode, original piece, noise tokens, spans) of one UL2 example; S counts its suffix as one span."""
    mode = {v: k for k, v in MODE.items()}[int(inputs[0])]
    body, targets = inputs[1:-1].tolist(), targets[:-1].tolist()
    if mode == "S":
        assert not set(body + targets) & set(sentinels)
        return mode, body + targets, len(targets), 1
    index = {s: k for k, s in enumerate(sentinels)}
    fills: list[list[int]] = []
    for t in targets:
        if t in index:
            assert index[t] == len(fills)
            fills.append([])
        else:
            fills[-1].append(t)
    original = [x for t in body for x in (fills[index[t]] if t in index else [t])]
    return mode, original, sum(map(len, fills)), len(fills)


def classify(mode: str, rate: float, mean_span: float, denoisers: list[Denoiser]) -> int:
    """The denoiser of this mode nearest in (rate, mean span), on a log scale."""
    options = [i for i, d in enumerate(denoisers) if d.kind == mode]
    if mode == "S":
        return options[0]

    def distance(i: int) -> float:
        return abs(np.log(rate / denoisers[i].rate)) + abs(np.log(mean_span / denoisers[i].mean_span))

    return min(options, key=distance)


def ul2(**options):
    return build_objective(UL2Config(**options), CTX)


def test_lengths_fit_every_denoiser():
    obj = ul2()
    for seq_len in (32, 128, 512):
        width = obj.window(seq_len)
        assert all(d.lengths(width)[0] <= seq_len for d in obj.denoisers)
        assert any(d.lengths(width + 1)[0] > seq_len for d in obj.denoisers)  # the longest that fits
        ex = obj(one_doc_rows(30, width))
        assert ex.input_ids.shape == (30, seq_len) and ex.labels.shape == (30, obj.target_len(seq_len))


def test_denoiser_shares_and_modes():
    obj = ul2()
    denoisers = paper_denoisers()
    batch = one_doc_rows(2100, obj.window(128))
    ex = obj(batch)
    counts = np.zeros(len(denoisers))
    for r in range(2100):
        mode, original, noise, spans = measure(*segment(ex, r))
        assert original == batch.tokens[r].tolist()
        counts[classify(mode, noise / len(original), noise / spans, denoisers)] += 1
    assert np.all(np.abs(counts / 2100 - 1 / 7) < 0.03), counts


def test_custom_weights_are_realised():
    # U-PaLM's mixture: 50% S, 25% X, 25% R.
    denoisers = [Denoiser("R", 3.0, 0.15, 0.25), Denoiser("S", rate=0.25, weight=0.5), Denoiser("X", 3.0, 0.5, 0.25)]
    obj = ul2(denoisers=denoisers)
    ex = obj(one_doc_rows(2000, obj.window(64), seed=1))
    modes = [int(ex.input_ids[r, 0]) for r in range(2000)]
    share = {k: modes.count(v) / 2000 for k, v in MODE.items()}
    assert abs(share["S"] - 0.5) < 0.04 and abs(share["R"] - 0.25) < 0.04 and abs(share["X"] - 0.25) < 0.04


def test_each_denoiser_keeps_its_rate_and_mean_span():
    # Long rows, so that even 64-token mean spans come out near 64 after T5's rounding of span counts,
    # and 300 sentinels, so that 3-token spans at rate 0.5 (190 spans) are not capped.
    sentinels = tuple(range(VOCAB - 1, VOCAB - 301, -1))
    special = SpecialTokens(eos=0, pad=1, nlu=NLU_ID, nlg=NLG_ID, s2s=S2S_ID, sentinels=sentinels)
    obj = build_objective(UL2Config(n_sentinels=300), ObjectiveContext(special, VOCAB, 5))
    denoisers = paper_denoisers()
    rng = np.random.default_rng(2)
    width = obj.window(1024)
    tokens = rng.integers(FIRST, VOCAB - 300, (280, width))
    batch = Batch(tokens, np.zeros_like(tokens), np.arange(280))
    ex = obj(batch)
    noise, tokens, spans = (np.zeros(len(denoisers)) for _ in range(3))
    for r in range(280):
        mode, original, n, s = measure(*segment(ex, r), sentinels)
        assert original == batch.tokens[r].tolist(), "inputs and targets reconstruct the row"
        k = classify(mode, n / len(original), n / s, denoisers)
        noise[k], tokens[k], spans[k] = noise[k] + n, tokens[k] + len(original), spans[k] + s
    for k, d in enumerate(denoisers):
        assert tokens[k] > 0
        assert abs(noise[k] / tokens[k] - d.rate) < 0.01, (d, noise[k] / tokens[k])
        if d.kind != "S":
            assert abs(noise[k] / spans[k] / d.mean_span - 1) < 0.15, (d, noise[k] / spans[k])


def test_packed_documents_each_get_the_rows_mode_token():
    obj = ul2()
    width = obj.window(96)
    rng = np.random.default_rng(3)
    rows = []
    for _ in range(40):
        docs = [rng.integers(FIRST, LAST, n) for n in (*rng.integers(5, 30, 3), width)]
        rows.append((np.concatenate([np.append(d, 0) for d in docs])[:width],
                     np.concatenate([np.full(d.size + 1, i) for i, d in enumerate(docs)])[:width], docs))
    ex = obj(Batch(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]), np.arange(40)))
    for r, (_, _, docs) in enumerate(rows):
        n_segments = int(ex.layout.segment_ids[r].max())
        assert n_segments >= 2
        modes = set()
        for s in range(1, n_segments + 1):
            mode, original, _, _ = measure(*segment(ex, r, s))
            modes.add(mode)
            assert original == docs[s - 1][: len(original)].tolist()
        assert len(modes) == 1  # one denoiser per row
        where = ex.decoder_layout.segment_ids[r] > 0
        assert torch.equal(ex.loss_mask[r], where.float())


def test_ul2_is_deterministic_per_sample():
    obj = ul2()
    batch = one_doc_rows(6, obj.window(64), seed=4, first_id=100)
    a = obj(batch)
    b = obj(Batch(batch.tokens[::-1].copy(), batch.doc_ids, batch.sample_ids[::-1].copy()))
    assert torch.equal(a.input_ids, b.input_ids.flip(0)) and torch.equal(a.labels, b.labels.flip(0))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("objective.denoisers=[]", "objective.denoisers"),
        ("objective.denoisers=[{kind: R, rate: 1.5}]", r"objective.denoisers\[0\].rate"),
        ("objective.denoisers=[{kind: X, mean_span: 0.5}]", r"objective.denoisers\[0\].mean_span"),
        ("objective.denoisers=[{kind: S, weight: 0}]", r"objective.denoisers\[0\].weight"),
        ("objective.denoisers=[{kind: Q}]", r"objective.denoisers\[0\].kind"),
    ],
)
def test_ul2_bad_options_name_the_key(override: str, key: str):
    base = ["model.arch=encoder_decoder", "objective.name=ul2"]
    assert load_config(None, base).objective.denoisers == paper_denoisers()
    with pytest.raises(ConfigError, match=key):
        load_config(None, [*base, override])


# ---------------------------------------------------------------- mix


def span_and_bart(span_weight: float = 1.0, bart_weight: float = 3.0) -> MixConfig:
    return MixConfig(components=[
        MixComponent(span_weight, SpanCorruptionConfig()),
        MixComponent(bart_weight, BartNoisingConfig(permute_sentences=False)),
    ])


def test_mix_weights_are_realised():
    obj = build_objective(span_and_bart(), CTX)
    ex = obj(one_doc_rows(2000, obj.window(24), seed=5))
    span_rows = (ex.labels[:, 0] == SENTINELS[0]).float().mean().item()  # span targets open with <extra_id_0>
    assert abs(span_rows - 0.25) < 0.03


def test_mix_stacks_components_into_one_example():
    seq_len = 48
    obj = build_objective(span_and_bart(), CTX)
    width = obj.window(seq_len)
    batch = one_doc_rows(16, width, seed=6, first_id=500)
    ex = obj(batch)
    span = build_objective(SpanCorruptionConfig(), CTX)
    bart = build_objective(BartNoisingConfig(permute_sentences=False), CTX)
    assert width == span.window(seq_len) > bart.window(seq_len)
    assert ex.input_ids.shape == (16, seq_len) and ex.labels.shape == (16, seq_len)  # BART targets are longest
    kinds = set()
    for r in range(16):
        is_span = bool(ex.labels[r, 0] == SENTINELS[0])
        kinds.add(is_span)
        part = span if is_span else bart
        w = part.window(seq_len)
        alone = part(Batch(batch.tokens[r : r + 1, :w], batch.doc_ids[r : r + 1, :w], batch.sample_ids[r : r + 1]))
        t = alone.labels.shape[1]
        # The component's own Example for this sample, padded: same noise, nothing extra.
        assert torch.equal(ex.input_ids[r], alone.input_ids[0])
        assert torch.equal(ex.labels[r, :t], alone.labels[0]) and (ex.loss_mask[r, t:] == 0).all()
        assert torch.equal(ex.decoder_input_ids[r, :t], alone.decoder_input_ids[0])
        assert (ex.decoder_layout.segment_ids[r, t:] == 0).all() and (ex.labels[r, t:] == SPECIAL.pad).all()
        assert torch.equal(ex.loss_mask[r, :t], alone.loss_mask[0])
    assert kinds == {True, False}


def test_mix_is_deterministic_per_sample():
    obj = build_objective(span_and_bart(), CTX)
    batch = one_doc_rows(12, obj.window(32), seed=7, first_id=40)
    a = obj(batch)
    order = np.random.default_rng(0).permutation(12)
    b = obj(Batch(batch.tokens[order], batch.doc_ids[order], batch.sample_ids[order]))
    for field in ("input_ids", "labels", "loss_mask", "decoder_input_ids"):
        assert torch.equal(getattr(a, field)[torch.from_numpy(order)], getattr(b, field))
    assert torch.equal(a.decoder_layout.segment_ids[torch.from_numpy(order)], b.decoder_layout.segment_ids)


def test_stack_examples_pads_and_fills_defaults():
    plain = Example(torch.full((2, 3), 7), torch.full((2, 3), 8), torch.ones(2, 3), AttentionLayout(causal=True))
    prefixed = Example(
        torch.full((1, 5), 9), torch.full((1, 5), 9), torch.ones(1, 5),
        AttentionLayout(True, segment_ids=torch.tensor([[1, 1, 2, 2, 2]]), prefix=torch.ones(1, 5, dtype=torch.bool)),
        position_ids=torch.tensor([[0, 1, 0, 1, 2]]),
    )
    out = stack_examples([plain, prefixed], pad_id=1)
    assert out.input_ids.tolist() == [[7, 7, 7, 1, 1], [7, 7, 7, 1, 1], [9] * 5]
    assert out.loss_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1] * 5]
    assert out.layout.segment_ids.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 2, 2, 2]]
    assert out.layout.prefix.tolist() == [[False] * 5, [False] * 5, [True] * 5]
    assert out.position_ids.tolist() == [[0, 1, 2, 0, 0], [0, 1, 2, 0, 0], [0, 1, 0, 1, 2]]
    assert out.decoder_input_ids is None and out.token_type_ids is None
    same = stack_examples([plain, plain], pad_id=1)
    assert same.layout.segment_ids is None and same.position_ids is None  # nothing to pad: None stays None
    bidirectional = Example(torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1, 3), AttentionLayout(causal=False))
    with pytest.raises(ValueError, match="different kinds"):
        stack_examples([plain, bidirectional], pad_id=1)


def test_mix_config_loads_and_checks_families():
    base = ["model.arch=encoder_decoder", "objective.name=mix"]
    spec = "[{weight: 1, objective: {name: span_corruption}}, {weight: 2, objective: {name: bart, mask_ratio: 0.2}}]"
    cfg = load_config(None, [*base, f"objective.components={spec}"]).objective
    assert cfg.families == ("encoder_decoder",)
    assert cfg.components[1] == MixComponent(2.0, BartNoisingConfig(mask_ratio=0.2))
    errors = {
        "[]": "objective.components",
        "[{weight: 0, objective: {name: bart}}]": r"objective.components\[0\].weight",
        "[{weight: 1, objective: {name: bart, mask_ratio: 2}}]": r"objective.components\[0\].objective.mask_ratio",
        "[{weight: 1, objective: {name: lm}}, {weight: 1, objective: {name: bart}}]": "share no model family",
        "[{weight: 1, objective: {name: nope}}]": "unknown objective",
    }
    for value, message in errors.items():
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*base, f"objective.components={value}"])
    decoder_mix = "[{weight: 1, objective: {name: span_corruption}}]"
    with pytest.raises(ConfigError, match="cannot train"):
        load_config(None, ["objective.name=mix", f"objective.components={decoder_mix}"])
