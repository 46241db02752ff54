"""The decoder: attention layouts never leak what they hide, init scales, parameter counts, RoPE layout."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    repeat_kv,
)
from transformers.models.llama.modeling_llama import rotate_half as hf_rotate_half

from lmforge.config import ConfigError
from lmforge.models import build_model, count_params
from lmforge.models.decoder import DecoderConfig as ModelConfig
from lmforge.models.layers import RMSNorm, padded_linear
from lmforge.models.masks import self_allowed
from lmforge.models.positions import RotaryEmbedding, apply_rotary, default_positions, rotate_half
from lmforge.objectives.base import AttentionLayout

VOCAB = 97
# A larger init than training's 0.02 makes one token's influence on other positions plainly visible.
TINY = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, init_std=0.1)


def docs(doc_ids: torch.Tensor) -> AttentionLayout:
    """Causal attention kept inside documents (segment ids start at 1: 0 means padding)."""
    return AttentionLayout(causal=True, segment_ids=doc_ids + 1)


def prefix(prefix_len: torch.Tensor, seq_len: int, doc_ids: torch.Tensor | None = None) -> AttentionLayout:
    flags = torch.arange(seq_len)[None] < prefix_len[:, None]
    return AttentionLayout(causal=True, prefix=flags, segment_ids=None if doc_ids is None else doc_ids + 1)


def tiny(**overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**TINY, **overrides})).eval()


MODELS = {"mha": tiny(), "gqa": tiny(n_kv_heads=2)}


def logits_with(model: torch.nn.Module, ids: torch.Tensor, layout: AttentionLayout | None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, layout)


def changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-position flag [B, T]: the logits there differ."""
    return (a - b).abs().amax(-1) > 1e-5


@pytest.mark.parametrize("heads", ["mha", "gqa"])
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_perturbing_a_token_never_changes_earlier_logits(heads: str, data: st.DataObject) -> None:
    seq_len = data.draw(st.integers(2, 24), label="seq_len")
    p = data.draw(st.integers(1, seq_len - 1), label="p")
    ids = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=seq_len, max_size=seq_len), label="ids")
    new = data.draw(st.integers(0, VOCAB - 1).filter(lambda t: t != ids[p]), label="new")
    # doc_ids all equal still routes attention through the explicit boolean-mask path.
    layout = data.draw(
        st.sampled_from([None, docs(torch.zeros(1, seq_len, dtype=torch.long))]),
        label="layout",
    )
    before = torch.tensor([ids])
    after = before.clone()
    after[0, p] = new
    a = logits_with(MODELS[heads], before, layout)
    b = logits_with(MODELS[heads], after, layout)
    assert_close(a[:, :p], b[:, :p], rtol=0, atol=1e-6)
    assert changed(a, b)[0, p:].all(), "the perturbed token must reach itself and later positions"


def test_doc_ids_keep_attention_inside_documents() -> None:
    model = MODELS["gqa"]
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 12))
    # Row 0: documents [0, 5) and [5, 12); row 1: [0, 8) and [8, 12).
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [3] * 8 + [4] * 4])
    layout = docs(doc_ids)
    perturbed = ids.clone()
    perturbed[:, 3] = (ids[:, 3] + 1) % VOCAB
    hit = changed(logits_with(model, ids, layout), logits_with(model, perturbed, layout))
    assert hit[0].tolist() == [False] * 3 + [True] * 2 + [False] * 7
    assert hit[1].tolist() == [False] * 3 + [True] * 5 + [False] * 4


def test_prefix_layout_sees_whole_prefix_but_not_beyond() -> None:
    model = MODELS["mha"]
    torch.manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, 10))
    layout = prefix(torch.tensor([4, 6]), 10)

    def hit_by(pos: int) -> list[list[bool]]:
        perturbed = ids.clone()
        perturbed[:, pos] = (ids[:, pos] + 1) % VOCAB
        return changed(logits_with(model, ids, layout), logits_with(model, perturbed, layout)).tolist()

    # Inside the prefix every position sees every prefix token, also later ones.
    assert hit_by(3) == [[True] * 10, [True] * 10]
    # Position 5 is in row 1's prefix only; after the prefix attention is causal again.
    assert hit_by(5) == [[False] * 5 + [True] * 5, [True] * 10]
    assert hit_by(7) == [[False] * 7 + [True] * 3, [False] * 7 + [True] * 3]


def reference_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The decoder written out with explicit softmax attention and transformers' repeat_kv, so it
    shares no attention code (SDPA, enable_gqa, our head expansion) with the model."""
    cos, sin = model.rope(default_positions(ids.shape[1], ids.device))
    B, T = ids.shape
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    allowed = causal if mask is None else mask
    x = model.embed_tokens(ids)
    for layer in model.layers:
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        group = attn.n_heads // attn.n_kv_heads
        k, v = repeat_kv(k, group), repeat_kv(v, group)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(attn.head_dim)
        y = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
        x = x + attn.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(model.norm(x))


GQA_LAYOUTS = {
    "causal": None,
    "doc_ids": docs(torch.tensor([[0] * 5 + [1] * 7, [3] * 8 + [4] * 4])),
    "prefix": prefix(torch.tensor([4, 6]), 12),
    "prefix+doc_ids": prefix(torch.tensor([3, 9]), 12, torch.tensor([[0] * 6 + [1] * 6, [2] * 12])),
}


@pytest.mark.parametrize("layout", GQA_LAYOUTS)
def test_grouped_query_attention_matches_a_reference(layout: str) -> None:
    model = tiny(n_kv_heads=2)  # 4 query heads, 2 kv heads: heads 0,1 read kv 0 and heads 2,3 read kv 1
    torch.manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, 12))
    chosen = GQA_LAYOUTS[layout]
    mask = None if chosen is None else self_allowed(chosen, 12, ids.device)
    with torch.no_grad():
        want = reference_logits(model, ids, mask)
    assert_close(logits_with(model, ids, chosen), want, rtol=0, atol=1e-5)


def test_grouped_query_mask_path_matches_the_maskless_path() -> None:
    """One document per row makes the doc mask exactly the causal triangle, so the masked path (kv
    heads expanded) and the fused causal path (enable_gqa) must agree."""
    model = MODELS["gqa"]
    torch.manual_seed(4)
    ids = torch.randint(0, VOCAB, (3, 16))
    one_doc = docs(torch.tensor([[0] * 16, [5] * 16, [2] * 16]))
    assert_close(logits_with(model, ids, one_doc), logits_with(model, ids, None), rtol=0, atol=1e-5)


def test_init_std_scales_residual_projections() -> None:
    cfg = ModelConfig(vocab_size=512, d_model=256, n_layers=4, n_heads=4, init_std=0.02)
    torch.manual_seed(0)
    model = build_model(cfg)
    residual = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        want = residual if name.endswith(("o_proj.weight", "down_proj.weight")) else cfg.init_std
        assert p.std().item() == pytest.approx(want, rel=0.03), name
        assert abs(p.mean().item()) < want * 0.05, name


def test_tied_embeddings_share_storage() -> None:
    tied, untied = tiny(tie_embeddings=True), tiny(tie_embeddings=False)
    assert tied.lm_head.weight.data_ptr() == tied.embed_tokens.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        tied.embed_tokens.weight[5].zero_()
    assert tied.lm_head.weight[5].abs().sum() == 0


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("n_kv_heads", [0, 2])
def test_param_count_matches_formula(tie: bool, n_kv_heads: int) -> None:
    cfg = ModelConfig(**{**TINY, "tie_embeddings": tie, "n_kv_heads": n_kv_heads, "d_ff": 80})
    d, head_dim, kv = cfg.d_model, cfg.d_model // cfg.n_heads, n_kv_heads or cfg.n_heads
    per_layer = 2 * d * d + 2 * d * kv * head_dim + 3 * d * cfg.d_ff + 2 * d
    embeddings = cfg.vocab_size * d * (1 if tie else 2)
    model = build_model(cfg)
    assert count_params(model) == embeddings + cfg.n_layers * per_layer + d
    assert count_params(model, non_embedding=True) == cfg.n_layers * per_layer + d


def test_resolve_d_ff() -> None:
    assert ModelConfig(d_model=64).resolved_d_ff() == 192
    assert ModelConfig(d_model=4096).resolved_d_ff() == 10944  # 10922.7 rounded up
    assert ModelConfig(d_model=768).resolved_d_ff() == 2048  # exact: no rounding
    assert ModelConfig(d_model=64, d_ff=100).resolved_d_ff() == 100


def test_build_model_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        build_model(ModelConfig())
    with pytest.raises(ConfigError, match="model.arch: unknown architecture 'nope'"):
        build_model(ModelConfig(arch="nope", vocab_size=10))


def test_rope_matches_transformers_llama() -> None:
    head_dim, seq_len, theta = 16, 37, 500.0
    hf_rope = LlamaRotaryEmbedding(
        LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=theta, max_position_embeddings=64)
    )
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, seq_len, head_dim), torch.randn(2, 2, seq_len, head_dim)
    hf_cos, hf_sin = hf_rope(q, torch.arange(seq_len)[None].expand(2, -1))
    hf_q, hf_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)

    rope = RotaryEmbedding(head_dim, theta)
    cos, sin = rope(default_positions(seq_len, q.device))
    assert_close(apply_rotary(q, cos, sin), hf_q, rtol=0, atol=1e-6)
    assert_close(apply_rotary(k, cos, sin), hf_k, rtol=0, atol=1e-6)
    assert torch.equal(rotate_half(q), hf_rotate_half(q))


def test_rmsnorm_matches_transformers_in_bf16() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 32).to(torch.bfloat16) * 7
    ours, theirs = RMSNorm(32, 1e-5), LlamaRMSNorm(32, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(32))
        theirs.weight.copy_(ours.weight)
    assert torch.equal(ours(x), theirs(x))


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 80), align=st.sampled_from([8, 64]), bias=st.booleans())
def test_padded_vocab_matmul_gives_the_plain_values_and_gradients(rows: int, align: int, bias: bool) -> None:
    """The vocabulary projection pads its matmul on CUDA (cuBLAS speed); what comes out and what
    flows back must be F.linear's exactly."""
    torch.manual_seed(rows)
    x = torch.randn(2, 3, 16, requires_grad=True)
    w = torch.randn(rows, 16, requires_grad=True)
    b = torch.randn(rows, requires_grad=True) if bias else None
    got = padded_linear(x, w, b, align)
    grads = torch.autograd.grad((got * torch.arange(rows)).sum(), [x, w] + ([b] if bias else []))
    want = torch.nn.functional.linear(x, w, b)
    want_grads = torch.autograd.grad((want * torch.arange(rows)).sum(), [x, w] + ([b] if bias else []))
    assert got.shape == want.shape == (2, 3, rows)
    assert_close(got, want)
    for g, wg in zip(grads, want_grads, strict=True):
        assert_close(g, wg)
