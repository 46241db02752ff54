"""S1/S3: activation checkpointing (full, selective) gives the same gradients while saving less for
backward; fp16 with dynamic loss scaling skips overflowing updates without rolling back; bf16 and
compile train like fp32 eager."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_train import make_trainer, tiny_cfg

from lmforge.models import build_model
from lmforge.recipe import load_config
from lmforge.train.memory import checkpoint_activations
from lmforge.train.parallel import Dist, clip_grad_norm, parallelize


def model_for(arch: str):
    extra = {"encoder_decoder": ["objective.name=span_corruption"], "encoder": ["objective.name=mlm",
                                                                                "objective.nsp=false",
                                                                                "model.nsp_head=false"]}
    cfg = load_config(None, ["model.vocab_size=64", f"model.arch={arch}", "model.d_model=32", "model.n_layers=2",
                             "model.n_heads=2", "model.max_seq_len=32", "train.seq_len=32", *extra.get(arch, [])])
    torch.manual_seed(0)
    return build_model(cfg.model)


def forward(model, arch: str, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids, decoder_input_ids=ids) if arch == "encoder_decoder" else model(ids)
    return (out["logits"] if isinstance(out, dict) else out).float().logsumexp(-1).sum()


def saved_bytes(model, arch: str, ids: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    """Bytes autograd keeps for backward during one forward, and the gradients after backward."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward(model, arch, ids)
    loss.backward()
    return total, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("arch", ["decoder", "encoder", "encoder_decoder"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_gradients_and_names_and_saves_memory(arch: str, mode: str) -> None:
    ids = torch.randint(1, 64, (4, 32), generator=torch.Generator().manual_seed(1))
    plain = model_for(arch)
    names = list(plain.state_dict())
    base_bytes, base_grads = saved_bytes(plain, arch, ids)
    wrapped = checkpoint_activations(model_for(arch), mode)
    assert list(wrapped.state_dict()) == names  # checkpoints and exports see the plain model
    got_bytes, got_grads = saved_bytes(wrapped, arch, ids)
    for g, w in zip(got_grads, base_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    limit = 0.5 if mode == "full" else 0.9
    assert got_bytes < limit * base_bytes, (got_bytes, base_bytes)


def test_fp16_overflow_skips_the_update_and_lowers_the_scale_without_rolling_back(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path, "train.precision=fp16", "train.max_steps=6", "train.checkpoint_every=100")
    trainer = make_trainer(cfg, tmp_path, init_seed=0)
    trainer.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # overflows at once
    before = [p.detach().clone() for p in trainer.model.parameters()]
    first = trainer.train_step()
    assert first["loss_scale"] < 2.0**40 and first["step"] == 1  # scale halved, the step counted
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters(), strict=True))  # no update
    records = [trainer.train_step() for _ in range(40)]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[-1]["loss"] < first["loss"]  # once the scale fits, it trains
    assert not any(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters(), strict=True))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_trains_like_fp32(tmp_path: Path, precision: str) -> None:
    def losses(p: str) -> list[float]:
        cfg = tiny_cfg(tmp_path / p, f"train.precision={p}", "train.max_steps=15", "train.checkpoint_every=100")
        result = make_trainer(cfg, tmp_path / p, init_seed=0).fit()
        return [result.losses[s] for s in sorted(result.losses)]

    full, half = losses("fp32"), losses(precision)
    assert half[-1] < half[0] - 0.5
    assert abs(half[-1] - full[-1]) < 0.15 * full[-1]


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(tmp_path: Path) -> None:
    eager = make_trainer(tiny_cfg(tmp_path / "e", "train.max_steps=4"), tmp_path / "e", init_seed=0)
    compiled_cfg = tiny_cfg(tmp_path / "c", "train.max_steps=4", "train.compile=true")
    compiled = make_trainer(compiled_cfg, tmp_path / "c", init_seed=0)
    compiled.model = parallelize(compiled.model, Dist(), compile_blocks=True)
    a = [eager.train_step()["loss"] for _ in range(4)]
    b = [compiled.train_step()["loss"] for _ in range(4)]
    assert b == pytest.approx(a, rel=1e-4)


@given(shapes=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=6),
       max_norm=st.sampled_from([0.0, 0.01, 1.0, 1e6]), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_clip_grad_norm_matches_torch(shapes: list[tuple[int, int]], max_norm: float, seed: int) -> None:
    """The trainer's norm (one fp64 multi-tensor launch per device, read once) and its clipping give
    torch's clip_grad_norm_ result; 0 means no clipping (the trainer passes inf for it)."""
    gen = torch.Generator().manual_seed(seed)
    ours = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    ref = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for a, b in zip(ours, ref, strict=True):
        a.grad = torch.randn(a.shape, generator=gen) * 3
        b.grad = a.grad.clone()
    norm = clip_grad_norm(ours, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(ref, max_norm if max_norm > 0 else math.inf)
    assert norm == pytest.approx(float(expected), rel=1e-6)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
