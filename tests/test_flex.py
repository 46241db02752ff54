"""`model.attention: flex` computes what the dense SDPA path computes for every layout the decoder
takes (packed documents with padding, prefix, window and sinks, ALiBi), and the plain causal case
still goes to SDPA's fused kernel. On CPU flex runs torch's unfused reference, forward only (torch
has no CPU backward for it); gradients and the fused kernel are checked by the gpu-marked test."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from test_masks import VOCAB, layouts

import lmforge.models.layers as layers_module
from lmforge.models import build_model
from lmforge.models.decoder import DecoderConfig
from lmforge.objectives.base import AttentionLayout
from lmforge.objectives.packing import segment_positions

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def pair(position: str, window: int, sinks: int, device: str = "cpu", d_model: int = 32
         ) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=VOCAB, d_model=d_model, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                        init_std=0.1, position=position, sliding_window=window, attention_sinks=sinks)
    dense = build_model(cfg).to(device)
    flex = build_model(dataclasses.replace(cfg, attention="flex")).to(device)
    flex.load_state_dict(dense.state_dict())
    return dense, flex


def inputs(case: dict, rows: int = 2) -> tuple[torch.Tensor, AttentionLayout, torch.Tensor]:
    T = len(case["ids"])
    ids = torch.tensor(case["ids"])[None].repeat(rows, 1)
    ids[1:] = ids[1:].roll(1, dims=1)  # rows differ, so a batch index mix-up shows
    seg = torch.tensor(case["seg"])[None]
    layout = AttentionLayout(
        causal=True,
        segment_ids=None if case["kind"] == "causal" else seg.expand(rows, -1),
        prefix=torch.tensor(case["prefix"])[None].expand(rows, -1) if "prefix" in case["kind"] else None,
    )
    positions = torch.from_numpy(segment_positions(seg.numpy())).expand(rows, T)
    return ids, layout, positions


def logits_and_grads(model: torch.nn.Module, ids, layout, positions) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    out = model(ids, layout, positions)
    out.logsumexp(-1).sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@settings(max_examples=30, deadline=None)
@given(case=layouts())
def test_flex_matches_the_dense_path(case: dict) -> None:
    dense, flex = pair(case["position"], case["window"], case["sinks"])
    ids, layout, positions = inputs(case)
    with torch.no_grad():
        torch.testing.assert_close(flex(ids, layout, positions), dense(ids, layout, positions), atol=2e-5, rtol=1e-5)


def test_flex_lowers_once_per_forward_and_plain_causal_stays_on_sdpa(monkeypatch) -> None:
    calls: list[str] = []
    sdpa, flex_attend = layers_module.F.scaled_dot_product_attention, layers_module.flex_attend
    monkeypatch.setattr(layers_module.F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append("sdpa") or sdpa(*a, **k))
    monkeypatch.setattr(layers_module, "flex_attend", lambda *a, **k: calls.append("flex") or flex_attend(*a, **k))
    _, model = pair("rope", 0, 0)
    ids = torch.randint(1, VOCAB, (2, 12))
    with torch.no_grad():
        model(ids)
        assert calls == ["sdpa", "sdpa"]
        calls.clear()
        model(ids, AttentionLayout(segment_ids=torch.tensor([[1] * 6 + [2] * 6] * 2)))
        assert calls == ["flex", "flex"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_flex_on_cuda_matches_sdpa_on_a_long_packed_row() -> None:
    dense, flex = pair("rope", 0, 0, "cuda", d_model=128)  # head dim 32: compiled flex needs >= 16
    T, rows = 1024, 2
    seg = torch.repeat_interleave(torch.arange(1, 9), T // 8)[None].expand(rows, -1)
    layout = AttentionLayout(causal=True, segment_ids=seg.cuda())
    positions = torch.from_numpy(segment_positions(seg.numpy())).cuda()
    ids = torch.randint(1, VOCAB, (rows, T), device="cuda")
    want, want_grads = logits_and_grads(dense, ids, layout, positions)
    got, got_grads = logits_and_grads(flex, ids, layout, positions)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-3, rtol=1e-3)


def test_training_with_flex_on_cpu_is_refused_with_the_reason() -> None:
    from lmforge.train.trainer import Trainer

    cfg = SimpleNamespace(model=SimpleNamespace(attention="flex"), train=SimpleNamespace(device="cpu"))
    with pytest.raises(RuntimeError, match="model.attention=flex trains on CUDA only"):
        Trainer(cfg, torch.nn.Linear(1, 1), None, None, "ckpt", "metrics.jsonl")
