"""The CUDA paths of the trainer, run where a GPU is (`pytest -m gpu`; skipped elsewhere): bf16 with
compiled blocks and selective activation checkpointing learns and resumes, fp16 keeps a dynamic loss
scale, and FSDP2 (with and without CPU offload) and DDP on NCCL give the single-process losses.

Tolerances: a CUDA run is not bitwise repeatable (SDPA's backward accumulates with atomics), so
wrapped runs agree with one process to a relative 1e-3 in fp32 over 6 steps, and a resumed bf16
run with the uninterrupted one to 2e-2 (bf16 rounding amplifies the atomics' differences)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.cli import main

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

COMMON = [
    "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=128", "train.seq_len=64",
    "train.max_steps=6", "train.checkpoint_every=3", "train.log_every=1", "train.schedule.name=constant",
    "train.schedule.warmup_steps=0", "train.optimizer.lr=3e-3", "tokenizer.vocab_size=400", "train.device=cuda",
    "train.batch_size=8", "data.filters=[]",
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpu")
    corpus = root / "corpus.jsonl"
    rng = np.random.default_rng(0)
    words = ["the", "model", "reads", "data", "and", "tokens", "in", "order", "to", "learn", "what", "comes", "next"]
    with corpus.open("w") as f:
        for i in range(400):
            f.write(json.dumps({"id": str(i), "text": " ".join(rng.choice(words, 80))}) + "\n")
    base = root / "base"
    for stage in ("data", "tokenizer", "tokenize"):
        assert main([stage, f"out_dir={base}", f"data.inputs={corpus}", *COMMON]) == 0
    return base


def clone(prepared: Path, out: Path) -> Path:
    out.mkdir(parents=True)
    for part in ("data", "tokenizer", "tokens"):
        os.symlink(prepared / part, out / part)
    return out


def train(out: Path, *overrides: str, torchrun: bool = False) -> list[dict]:
    args = ["train", f"out_dir={out}", *COMMON, *overrides]
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port",
                str(29600 + os.getpid() % 1000)] if torchrun else []
    done = subprocess.run([sys.executable, *launcher, "-m", "lmforge", *args], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def close(a: dict[int, float], b: dict[int, float], rel: float = 1e-3) -> None:
    assert sorted(a) == sorted(b)
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=rel), (step, a[step], b[step])


def test_bf16_compiled_checkpointed_training_learns_and_resumes(prepared, tmp_path):
    options = ["train.precision=bf16", "train.compile=true", "train.activation_checkpointing=selective",
               "train.max_steps=30", "train.checkpoint_every=15"]
    whole = losses(train(clone(prepared, tmp_path / "whole"), *options))
    assert whole[30] < 0.8 * whole[1]
    out = clone(prepared, tmp_path / "resumed")
    train(out, *options[:-2], "train.max_steps=15", "train.checkpoint_every=15")
    resumed = losses(train(out, *options))
    close({s: resumed[s] for s in range(16, 31)}, {s: whole[s] for s in range(16, 31)}, rel=2e-2)


def test_fp16_keeps_a_dynamic_loss_scale(prepared, tmp_path):
    records = [r for r in train(clone(prepared, tmp_path / "fp16"), "train.precision=fp16") if "loss" in r]
    assert all(np.isfinite(r["loss"]) and r["loss_scale"] > 0 for r in records)
    assert records[-1]["loss"] < records[0]["loss"]


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp+offload"])
def test_nccl_wrappers_give_the_single_process_losses(prepared, tmp_path, mode):
    one = losses(train(clone(prepared, tmp_path / "one")))
    options = ["train.parallel.mode=fsdp", "train.parallel.cpu_offload=true"] if mode == "fsdp+offload" else [
        f"train.parallel.mode={mode}"]
    close(losses(train(clone(prepared, tmp_path / mode), *options, torchrun=True)), one)


def test_a_model_built_on_the_gpu_starts_from_the_cpu_weights():
    """models.init draws on the CPU generator whatever the device, so a seed means the same weights
    on CPU and GPU (and in every parallel layout, tests/test_distributed.py)."""
    from lmforge.models import build_model
    from lmforge.recipe import load_config

    cfg = load_config(None, ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.vocab_size=300"]).model
    torch.manual_seed(0)
    on_cpu = build_model(cfg)
    torch.manual_seed(0)
    on_gpu = build_model(cfg, device="cuda")
    for (name, a), (_, b) in zip(on_cpu.named_parameters(), on_gpu.named_parameters(), strict=True):
        assert torch.equal(a, b.cpu()), name
