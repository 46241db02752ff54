"""No attention layout leaks: perturbing a token a position must not see leaves that position's logits
unchanged, for causal, prefix, document-masked and windowed decoders (property-tested against a
visibility rule written out here, not taken from models/masks.py)."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lmforge.models.decoder as decoder_module
import lmforge.models.layers as layers_module
from lmforge.models import build_model
from lmforge.models.decoder import DecoderConfig
from lmforge.models.masks import lower, self_allowed
from lmforge.objectives.base import AttentionLayout, ObjectiveContext, build_objective
from lmforge.objectives.lm import LMConfig
from lmforge.objectives.packing import segment_positions, separator_segments
from lmforge.tokenizer.special_tokens import SpecialTokens
from lmforge.tokens.loader import Batch

VOCAB, LAYERS, EOS = 61, 2, 0


@cache
def tiny(position: str, window: int, sinks: int) -> torch.nn.Module:
    torch.manual_seed(0)
    # A larger init than training's makes one token's influence on another plainly visible.
    cfg = DecoderConfig(vocab_size=VOCAB, d_model=32, n_layers=LAYERS, n_heads=4, n_kv_heads=2, max_seq_len=32,
                        init_std=0.1, position=position, sliding_window=window, attention_sinks=sinks)
    return build_model(cfg).eval()


def visible(seg: list[int], prefix: list[bool], pos: list[int], window: int, sinks: int) -> np.ndarray:
    """[T, T] may query i attend to key j in one layer: same non-padding segment, j not after i unless
    both are in the bidirectional prefix, inside the window (or a sink); padding sees itself only."""
    T = len(seg)
    out = np.zeros((T, T), dtype=bool)
    for i in range(T):
        for j in range(T):
            if seg[i] == 0:
                out[i, j] = i == j
                continue
            order = j <= i or (prefix[i] and prefix[j])
            near = window == 0 or pos[i] - pos[j] < window or pos[j] < sinks
            out[i, j] = seg[j] == seg[i] and order and near
    return out


def reachable(direct: np.ndarray, layers: int) -> np.ndarray:
    """What the logits at i can depend on after `layers` attention layers (each token sees itself)."""
    out = direct.copy()
    for _ in range(layers - 1):
        out = (out.astype(int) @ direct.astype(int)) > 0
    return out


@st.composite
def layouts(draw: st.DrawFn) -> dict:
    """A row: plain causal, a prefix, packed documents (with padding anywhere) or both; sometimes a window."""
    T = draw(st.integers(2, 20), label="T")
    kind = draw(st.sampled_from(["causal", "prefix", "documents", "documents+prefix"]), label="kind")
    seg, prefix = [1] * T, [False] * T
    if kind.startswith("documents"):
        seg, doc = [], 1
        while len(seg) < T:
            length = draw(st.integers(1, T - len(seg)), label="chunk length")
            padding = draw(st.booleans(), label="padding chunk")
            seg += [0 if padding else doc] * length
            doc += not padding
    if kind.endswith("prefix"):
        i = 0
        while i < T:
            j = i
            while j < T and seg[j] == seg[i]:
                j += 1
            if seg[i]:
                n = draw(st.integers(0, j - i), label="prefix length")
                prefix[i : i + n] = [True] * n
            i = j
    window = draw(st.sampled_from([0, 0, 1, 2, 3, 5]), label="window")
    sinks = draw(st.integers(0, 2), label="sinks") if window else 0
    position = draw(st.sampled_from(["rope", "alibi", "learned"]), label="position")
    ids = draw(st.lists(st.integers(1, VOCAB - 1), min_size=T, max_size=T), label="ids")
    return dict(kind=kind, seg=seg, prefix=prefix, window=window, sinks=sinks, position=position, ids=ids)


def perturbed_logits(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the row and of T copies, copy j with token j replaced: [T+1, T, V]."""
    T = len(case["ids"])
    ids = torch.tensor(case["ids"]).repeat(T + 1, 1)
    ids[1 + torch.arange(T), torch.arange(T)] = ids[0] % (VOCAB - 1) + 1  # another token in [1, VOCAB)
    seg = torch.tensor(case["seg"])[None]
    plain = case["kind"] == "causal"
    layout = AttentionLayout(
        causal=True,
        segment_ids=None if plain else seg.expand(T + 1, -1),
        prefix=torch.tensor(case["prefix"])[None].expand(T + 1, -1) if "prefix" in case["kind"] else None,
    )
    positions = torch.from_numpy(segment_positions(seg.numpy()))
    with torch.no_grad():
        out = tiny(case["position"], case["window"], case["sinks"])(ids, layout, positions.expand(T + 1, -1))
    return out, positions[0]


@settings(max_examples=300, deadline=None)
@given(case=layouts())
def test_no_layout_leaks_and_visible_tokens_matter(case: dict) -> None:
    out, positions = perturbed_logits(case)
    assert torch.isfinite(out).all()
    direct = visible(case["seg"], case["prefix"], positions.tolist(), case["window"], case["sinks"])
    seen = reachable(direct, LAYERS)
    changed = ((out[1:] - out[0]).abs().amax(-1) > 1e-6).numpy().T  # [position i, perturbed j]
    hidden_changed = changed & ~seen
    assert not hidden_changed.any(), f"leak: position i sees j at {np.argwhere(hidden_changed).tolist()}"
    # Every path of attention carries some influence: a mask that hides too much fails here.
    missed = seen & ~changed
    assert not missed.any(), f"a visible token had no effect at {np.argwhere(missed).tolist()}"


@pytest.mark.parametrize("position", ["rope", "alibi", "learned"])
@pytest.mark.parametrize("window", [0, 3])
def test_padding_rows_give_no_nan_forward_or_backward(position: str, window: int) -> None:
    model = tiny(position, window, 1 if window else 0)
    # Row 0: all padding; row 1: a document then padding; row 2: two documents, prefix on the first.
    seg = torch.tensor([[0] * 8, [1] * 5 + [0] * 3, [1] * 3 + [2] * 5])
    prefix = torch.tensor([[False] * 8, [True] * 2 + [False] * 6, [True] * 2 + [False] * 6])
    layout = AttentionLayout(causal=True, segment_ids=seg, prefix=prefix)
    positions = torch.from_numpy(segment_positions(seg.numpy()))
    ids = torch.randint(1, VOCAB, (3, 8), generator=torch.Generator().manual_seed(0))
    model.zero_grad()
    logits = model(ids, layout, positions)
    assert torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad()


def test_plain_causal_layout_takes_the_fused_kernel_and_masks_are_built_once(monkeypatch) -> None:
    calls: list[dict] = []
    builds: list[int] = []
    sdpa, build = layers_module.F.scaled_dot_product_attention, decoder_module.self_allowed

    def spy_sdpa(*args, **kwargs):
        calls.append(kwargs)
        return sdpa(*args, **kwargs)

    def spy_build(*args, **kwargs):
        builds.append(1)
        return build(*args, **kwargs)

    monkeypatch.setattr(layers_module.F, "scaled_dot_product_attention", spy_sdpa)
    monkeypatch.setattr(decoder_module, "self_allowed", spy_build)
    model, ids = tiny("rope", 0, 0), torch.randint(1, VOCAB, (2, 12))
    assert lower(self_allowed(AttentionLayout(), 12, "cpu"), None, True, 12, 12, "cpu").attn_mask is None
    for layout in (None, AttentionLayout()):
        calls.clear()
        builds.clear()
        with torch.no_grad():
            model(ids, layout)
        assert len(calls) == LAYERS and len(builds) == 1
        assert all(c.get("is_causal") and c.get("attn_mask") is None for c in calls)
    calls.clear()
    with torch.no_grad():
        model(ids, AttentionLayout(segment_ids=torch.ones(2, 12, dtype=torch.long)))
    assert all(c.get("attn_mask") is not None and not c.get("is_causal") for c in calls)


def test_lm_document_mask_gives_the_separator_to_the_next_document() -> None:
    """Packed `a b c EOS d e EOS f g`: the EOS after a document predicts the next document's first
    token, so it belongs to that document's segment, at its position 0, and sees nothing before it."""
    tokens = np.array([[5, 6, 7, EOS, 8, 9, EOS, 10, 11, 12], [EOS, 13, 14, 15, EOS, EOS, 16, 17, 18, 19]])
    doc_ids = np.array([[4, 4, 4, 4, 5, 5, 5, 6, 6, 6], [0, 1, 1, 1, 1, 2, 3, 3, 3, 3]])
    special = SpecialTokens(eos=EOS)
    ex = build_objective(LMConfig(document_mask=True), ObjectiveContext(special, VOCAB))(
        Batch(tokens, doc_ids, np.array([0, 1]))
    )
    assert ex.layout.segment_ids.tolist() == [[1, 1, 1, 2, 2, 2, 3, 3, 3], [1, 1, 1, 1, 2, 3, 3, 3, 3]]
    assert ex.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 0, 1, 2, 3]]
    assert separator_segments(tokens, doc_ids, EOS).min() == 1  # 0 stays free for padding
    assert ex.labels[0, 3] == 8 and ex.loss_mask.all()
    model = tiny("rope", 0, 0)
    with torch.no_grad():
        base = model(ex.input_ids, ex.layout, ex.position_ids)
        for j in range(9):
            ids = ex.input_ids.clone()
            ids[0, j] = 30
            hit = (model(ids, ex.layout, ex.position_ids) - base)[0].abs().amax(-1) > 1e-6
            segment = ex.layout.segment_ids[0]
            assert hit.tolist() == [bool(segment[i] == segment[j] and i >= j) for i in range(9)], j
