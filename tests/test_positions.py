"""A5 positions and long context: RoPE scaling, ALiBi slopes, T5 buckets, sliding windows with sinks,
and what the Llama export can and cannot represent."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes
from transformers.models.t5.modeling_t5 import T5Attention

from lmforge.config import TokenizerConfig
from lmforge.export import exporter_for
from lmforge.export.hf import import_hf_llama
from lmforge.models import build_model
from lmforge.models.decoder import DecoderConfig
from lmforge.models.positions import ALiBi, RotaryEmbedding, alibi_slopes, t5_relative_bucket
from lmforge.objectives.base import AttentionLayout
from lmforge.objectives.lm import LMConfig
from lmforge.objectives.prefix_lm import PrefixLMConfig
from lmforge.tokenizer.train import train_tokenizer

POSITIONS = torch.arange(0, 300, 7)[None]


# ---------------------------------------------------------------- RoPE scaling


@pytest.mark.parametrize("scaling", ["linear", "ntk"])
def test_rope_scaling_with_factor_one_is_plain_rope(scaling: str) -> None:
    plain = RotaryEmbedding(16, 10000.0)(POSITIONS)
    scaled = RotaryEmbedding(16, 10000.0, scaling, 1.0)(POSITIONS)
    assert torch.equal(scaled[0], plain[0]) and torch.equal(scaled[1], plain[1])


def test_linear_scaling_divides_positions_by_the_factor() -> None:
    scaled = RotaryEmbedding(16, 500.0, "linear", 4.0)(POSITIONS)
    plain = RotaryEmbedding(16, 500.0)(POSITIONS.float() / 4.0)
    assert_close(scaled, plain, rtol=0, atol=0)
    # Interpolation: position 4p after scaling is position p before.
    assert_close(RotaryEmbedding(16, 500.0, "linear", 4.0)(4 * POSITIONS), RotaryEmbedding(16, 500.0)(POSITIONS))


@pytest.mark.parametrize("head_dim", [8, 32])
def test_ntk_scaling_is_rope_with_a_larger_base(head_dim: int) -> None:
    theta, factor = 10000.0, 8.0
    ntk = RotaryEmbedding(head_dim, theta, "ntk", factor)(POSITIONS)
    bigger_base = RotaryEmbedding(head_dim, theta * factor ** (head_dim / (head_dim - 2)))(POSITIONS)
    assert_close(ntk, bigger_base, rtol=0, atol=0)
    # What the base change is for: the highest frequency is kept, the lowest is slowed by `factor`,
    # so the lowest-frequency angle at position factor*p equals plain RoPE's at p.
    cos_ntk, _ = RotaryEmbedding(head_dim, theta, "ntk", factor)(factor * POSITIONS)
    cos_plain, _ = RotaryEmbedding(head_dim, theta)(POSITIONS)
    last = head_dim // 2 - 1
    assert_close(cos_ntk[..., last], cos_plain[..., last], rtol=0, atol=1e-5)
    cos_ntk, _ = RotaryEmbedding(head_dim, theta, "ntk", factor)(POSITIONS)
    assert torch.equal(cos_ntk[..., 0], cos_plain[..., 0])


# ---------------------------------------------------------------- ALiBi


def test_alibi_slopes_match_hand_computed_reference_values() -> None:
    """Expected values worked out from the reference get_slopes recipe (ofirpress/attention_with_
    linear_biases): n a power of two -> 2^(-8k/n), k = 1..n; otherwise the power of two below n,
    then every other slope of twice that count, as many as are missing."""
    eight = [2.0**-k for k in range(1, 9)]
    assert alibi_slopes(8) == pytest.approx(eight, rel=1e-12)
    # 12 = 8 + 4: slopes of 16 heads are 2^(-k/2); every other one from the first: 2^-0.5, 2^-1.5, ...
    assert alibi_slopes(12) == pytest.approx(eight + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5], rel=1e-12)
    # 6 = 4 + 2: 4 heads give 2^(-2k); 8 heads' slopes 2^-1, 2^-3 fill the rest.
    assert alibi_slopes(6) == pytest.approx([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3], rel=1e-12)
    # 20 = 16 + 4: 16 heads give 2^(-k/2); 32 heads' 2^(-k/4) at k = 1, 3, 5, 7.
    assert alibi_slopes(20) == pytest.approx(
        [2.0 ** (-k / 2) for k in range(1, 17)] + [2.0**-0.25, 2.0**-0.75, 2.0**-1.25, 2.0**-1.75], rel=1e-12
    )


@pytest.mark.parametrize("n_heads", [1, 2, 3, 5, 6, 7, 12, 16, 24, 40, 64, 112])
def test_alibi_slopes_match_bloom(n_heads: int) -> None:
    bloom = _get_alibi_slopes(n_heads, torch.device("cpu")).double().tolist()
    assert alibi_slopes(n_heads) == pytest.approx(bloom, rel=1e-6)


def test_alibi_bias_is_the_reference_bias_under_a_causal_softmax() -> None:
    """The reference adds slope * key_position; ours adds -slope * |query - key|. Under a causal mask
    the two differ by a per-query constant, which softmax ignores."""
    T, H = 9, 12
    pos = torch.arange(T)[None]
    ours = ALiBi(H)(pos, pos)[0]
    reference = torch.tensor(alibi_slopes(H))[:, None, None] * pos.float()[None]
    scores = torch.randn(H, T, T, generator=torch.Generator().manual_seed(0))
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    a = (scores + ours).masked_fill(future, float("-inf")).softmax(-1)
    b = (scores + reference).masked_fill(future, float("-inf")).softmax(-1)
    assert_close(a, b, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- T5 relative buckets


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(("num_buckets", "max_distance"), [(32, 128), (16, 40), (64, 256)])
def test_t5_buckets_match_transformers(bidirectional: bool, num_buckets: int, max_distance: int) -> None:
    q = torch.arange(0, 400, 3)
    relative = q[None, :] - q[:, None]  # key - query, as both implementations take it
    ours = t5_relative_bucket(relative, bidirectional, num_buckets, max_distance)
    theirs = T5Attention._relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    assert torch.equal(ours, theirs)
    assert int(ours.max()) == num_buckets - 1  # beyond max_distance: the last bucket


# ---------------------------------------------------------------- sliding window + sinks


@pytest.mark.parametrize("position", ["rope", "alibi", "learned"])
def test_windowed_decoder_ignores_tokens_outside_its_window_but_sees_sinks(position: str) -> None:
    """One layer, so what position p depends on is exactly what it attends to: the last `window`
    positions (p itself included) and the first `sinks` positions of its document."""
    window, sinks, T = 4, 2, 16
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=4, max_seq_len=32, init_std=0.1,
                        position=position, sliding_window=window, attention_sinks=sinks)
    model = build_model(cfg).eval()
    ids = torch.randint(1, 50, (1, T))
    # Two documents: [0, 6) and [6, 16); positions restart, so the second document has its own sinks.
    segments = torch.tensor([[1] * 6 + [2] * 10])
    positions = torch.tensor([list(range(6)) + list(range(10))])
    layout = AttentionLayout(causal=True, segment_ids=segments)
    perturbed = ids.repeat(T, 1)
    perturbed[torch.arange(T), torch.arange(T)] = ids[0] % 49 + 1  # ids are in [1, 49]: never the same token
    with torch.no_grad():
        base = model(ids, layout, positions)
        moved = model(perturbed, AttentionLayout(causal=True, segment_ids=segments.expand(T, -1)),
                      positions.expand(T, -1))
    hit = (moved - base).abs().amax(-1) > 1e-6  # [perturbed j, position p]
    for p in range(T):
        seen = [j for j in range(T) if segments[0, j] == segments[0, p] and j <= p
                and (positions[0, p] - positions[0, j] < window or positions[0, j] < sinks)]
        assert hit[:, p].nonzero().flatten().tolist() == seen, f"position {p}"
    # Position 15 (document position 9) sees 12..15 and the sinks 6, 7, nothing else.
    assert hit[:, 15].nonzero().flatten().tolist() == [6, 7, 12, 13, 14, 15]


# ---------------------------------------------------------------- Llama export


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = ["the model reads tokens and writes logits", "def f(x):\n    return x ** 2", "café naïve 日本語"] * 30
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(texts, TokenizerConfig(vocab_size=600), path, progress=False)
    return path


def tiny_decoder(**options: object) -> DecoderConfig:
    return DecoderConfig(vocab_size=600, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                         rope_theta=1000.0, norm_eps=1e-6, init_std=0.1, **options)


def export_and_verify(cfg: DecoderConfig, tokenizer_path: Path, out: Path) -> tuple[dict, dict]:
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    exporter = exporter_for(cfg, LMConfig())
    exporter.export(model, cfg, tokenizer_path, out)
    report = exporter.verify(model, out, seed=0)
    return report, json.loads((out / "config.json").read_text())


def test_linear_rope_scaling_exports_as_llama_rope_scaling(tokenizer_path: Path, tmp_path: Path) -> None:
    cfg = tiny_decoder(rope_scaling="linear", rope_factor=2.0)
    report, hf = export_and_verify(cfg, tokenizer_path, tmp_path / "hf")
    assert report["max_abs_diff"] < 1e-4 and report["tokenizer_match"]
    assert hf["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}
    imported, imported_cfg = import_hf_llama(tmp_path / "hf")  # and back: the mapping is exact both ways
    assert (imported_cfg.rope_scaling, imported_cfg.rope_factor) == ("linear", 2.0)
    # The check could fail: the same weights without the scaling compute something else.
    torch.manual_seed(0)
    scaled, plain = build_model(cfg).eval(), build_model(tiny_decoder()).eval()
    plain.load_state_dict(scaled.state_dict())
    ids = torch.randint(0, 600, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (scaled(ids) - plain(ids)).abs().max() > 100 * 1e-4  # 100x the export check's bound


def test_ntk_scaling_exports_as_a_larger_rope_theta(tokenizer_path: Path, tmp_path: Path) -> None:
    cfg = tiny_decoder(rope_scaling="ntk", rope_factor=4.0)
    report, hf = export_and_verify(cfg, tokenizer_path, tmp_path / "hf")
    assert report["max_abs_diff"] < 1e-4 and report["tokenizer_match"]
    head_dim = cfg.head_dim
    assert hf["rope_parameters"]["rope_type"] == "default"
    assert hf["rope_parameters"]["rope_theta"] == pytest.approx(1000.0 * 4.0 ** (head_dim / (head_dim - 2)), rel=1e-12)
    assert not math.isclose(hf["rope_parameters"]["rope_theta"], 1000.0)


@pytest.mark.parametrize(
    ("options", "objective", "named"),
    [
        ({"position": "alibi"}, LMConfig(), "model.position='alibi'"),
        ({"position": "learned"}, LMConfig(), "model.position='learned'"),
        ({"sliding_window": 8}, LMConfig(), "model.sliding_window=8"),
        ({"sliding_window": 8, "attention_sinks": 2}, LMConfig(), "model.sliding_window=8"),
        ({}, PrefixLMConfig(), "prefix_lm"),
    ],
    ids=["alibi", "learned", "sliding_window", "sinks", "prefix_lm"],
)
def test_llama_export_refuses_what_llama_cannot_compute(options: dict, objective: object, named: str) -> None:
    with pytest.raises(ValueError, match=f"cannot export to LlamaForCausalLM: .*{named}"):
        exporter_for(tiny_decoder(**options), objective)
