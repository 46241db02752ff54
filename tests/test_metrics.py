"""E8: training metrics: the FLOP count behind MFU, the peak table, and what Trainer.fit writes
(JSONL fields, TensorBoard events, the loss/LR plot, plain console lines off a terminal)."""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from lmforge.models import build_model, count_params
from lmforge.objectives import ObjectiveContext, build_objective
from lmforge.recipe import load_config
from lmforge.train.metrics import console_mode, flops_per_token, gpu_peak_flops, matmul_params
from lmforge.train.probe import RandomTokens, default_special_tokens
from lmforge.train.trainer import Trainer

VOCAB = 97


def tiny_cfg(tmp_path: Path, *overrides: str):
    return load_config(None, [
        f"out_dir={tmp_path}", f"model.vocab_size={VOCAB}", "model.d_model=32", "model.n_layers=2",
        "model.n_heads=2", "model.max_seq_len=32", "train.seq_len=16", "train.batch_size=4", "train.max_steps=6",
        "train.schedule.warmup_steps=2", "train.checkpoint_every=100", "train.log_every=2", "train.device=cpu",
        *overrides,
    ])


def make_trainer(cfg, progress: bool = False, loader=None) -> Trainer:
    torch.manual_seed(0)
    objective = build_objective(cfg.objective, ObjectiveContext(default_special_tokens(VOCAB), VOCAB, cfg.seed))
    loader = loader or RandomTokens(objective.window(cfg.train.seq_len), cfg.train.batch_size, VOCAB, 0)
    return Trainer(cfg, build_model(cfg.model), loader, objective, cfg.out / "checkpoints", cfg.out / "metrics.jsonl",
                   progress=progress)


def test_flops_per_token_is_6n_plus_attention(tmp_path: Path):
    model = build_model(tiny_cfg(tmp_path).model)
    d, layers, f = 32, 2, model.cfg.resolved_d_ff()
    linear = layers * (4 * d * d + 3 * d * f) + VOCAB * d  # q, k, v, o; gate, up, down; the tied head once
    assert matmul_params(model) == linear
    norms = (2 * layers + 1) * d
    assert count_params(model) == linear + norms  # the tied embedding is the head: no lookup-only table
    assert flops_per_token(model, 16) == 6 * linear + 12 * layers * d * 16

    untied = build_model(tiny_cfg(tmp_path, "model.tie_embeddings=false", "model.position=learned").model)
    assert matmul_params(untied) == linear  # input table and positions are lookups, not matmuls


@pytest.mark.parametrize(("name", "bf16", "fp32"), [
    ("NVIDIA H100 80GB HBM3", 989e12, 67e12),
    ("NVIDIA H100 PCIe", 756e12, 51e12),
    ("NVIDIA H100 NVL", 835e12, 60e12),
    ("NVIDIA H200", 989e12, 67e12),
    ("NVIDIA GH200 480GB", 989e12, 67e12),
    ("NVIDIA A100-SXM4-80GB", 312e12, 19.5e12),
    ("NVIDIA A100 80GB PCIe", 312e12, 19.5e12),
    ("NVIDIA L40S", 362e12, 91.6e12),
    ("NVIDIA L4", 121e12, 30.3e12),
    ("NVIDIA A10", 125e12, 31.2e12),
])
def test_peak_table_matches_device_names(name: str, bf16: float, fp32: float):
    assert gpu_peak_flops(name, "bf16")[0] == bf16
    assert gpu_peak_flops(name, "fp32")[0] == fp32
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # fp32 matmuls on TF32 tensor cores
        assert gpu_peak_flops(name, "fp32")[0] == bf16 / 2
    finally:
        torch.set_float32_matmul_precision(before)


def test_unknown_gpu_has_no_mfu():
    peak, why = gpu_peak_flops("NVIDIA A10G", "bf16")  # not the A10: not guessed
    assert peak is None and "PEAK_FLOPS" in why


def test_fit_writes_metrics_tensorboard_and_plot(tmp_path: Path):
    cfg = tiny_cfg(tmp_path)
    make_trainer(cfg).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    for r in records:
        assert {"loss", "lr", "grad_norm", "tokens", "step_s", "data_s"} <= set(r)
        assert 0 <= r["data_s"] <= r["step_s"]
        logged = r["step"] % 2 == 0
        assert ("tokens_per_s" in r) == logged and ("mfu" in r) == logged  # CPU: against a measured peak
        if logged:
            assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1.5
    assert (tmp_path / "plots" / "loss_lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and b"train/loss" in events[0].read_bytes()


def test_time_waiting_for_data_is_measured(tmp_path: Path):
    cfg = tiny_cfg(tmp_path, "train.max_steps=3")

    class SlowLoader(RandomTokens):
        def next_batch(self):
            time.sleep(0.03)
            return super().next_batch()

    make_trainer(cfg, loader=SlowLoader(17, 4, VOCAB, 0)).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(0.03 <= r["data_s"] <= r["step_s"] for r in records)


def test_plain_lines_when_not_a_terminal(tmp_path: Path, capsys):
    make_trainer(tiny_cfg(tmp_path), progress=True).fit()  # pytest's captured stderr is no terminal
    err = capsys.readouterr().err
    steps = [line for line in err.splitlines() if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["2/6", "4/6", "6/6"]
    assert all("tok/s" in s and "mfu" in s and "data" in s for s in steps)
    assert "\r" not in err  # no bar redraws in a log file


def test_console_mode(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    assert console_mode(True) == "bar"
    assert console_mode(False) == "off"
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert console_mode(True) == "lines"
