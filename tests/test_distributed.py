"""S2/P7 on CPU with 2 processes on gloo, launched the way users launch them (torchrun, `-m lmforge`):
DDP, FSDP2, tensor and pipeline parallel runs give the losses one process gives with the same global
batch, and DCP checkpoints resume on another world size and layout with the exact next batches.

Tolerances: data-parallel modes reduce gradients in another order than one process sums them, so
losses agree to a relative 1e-5 over 6 steps; TP splits matmuls (1e-4); PP sums micro-batch losses
(1e-5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmforge.cli import main

pytestmark = pytest.mark.slow

FLAT = "train.schedule.name=constant"  # resharding runs stop at step 4 via max_steps: the LR must not depend on it
COMMON = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=64", "model.tie_embeddings=false",
    "train.seq_len=32", "train.max_steps=6", "train.checkpoint_every=2", "train.log_every=1",
    "train.schedule.warmup_steps=2", "train.optimizer.lr=3e-3", "tokenizer.vocab_size=400", "train.device=cpu",
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Data, tokenizer and token sets made once; each run copies them into its own out_dir."""
    root = tmp_path_factory.mktemp("dist")
    corpus = root / "corpus.jsonl"
    rng = np.random.default_rng(0)
    words = ["the", "model", "reads", "data", "and", "tokens", "in", "order", "to", "learn", "what", "comes",
             "next", "a", "text"]
    with corpus.open("w") as f:
        for i in range(400):
            f.write(json.dumps({"id": str(i), "text": " ".join(rng.choice(words, 60))}) + "\n")
    base = root / "base"
    for stage in ("data", "tokenizer", "tokenize"):
        assert main([stage, f"out_dir={base}", f"data.inputs={corpus}", "data.filters=[]", *COMMON]) == 0
    return base


@pytest.fixture(scope="module")
def one_rank(prepared, tmp_path_factory) -> dict[str, dict[int, float]]:
    """The single-process runs every comparison is against (global batch 8), made once."""
    root = tmp_path_factory.mktemp("one")
    return {"cosine": train(clone(prepared, root / "cosine"), 1, "train.batch_size=8"),
            "constant": train(clone(prepared, root / "constant"), 1, "train.batch_size=8", FLAT)}


def clone(prepared: Path, out: Path) -> Path:
    out.mkdir(parents=True)
    for part in ("data", "tokenizer", "tokens"):
        os.symlink(prepared / part, out / part)
    return out


def train(out: Path, nproc: int, *overrides: str) -> dict[int, float]:
    args = ["train", f"out_dir={out}", "data.filters=[]", *COMMON, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "lmforge", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(29500 + os.getpid() % 1000), "-m", "lmforge", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def close(a: dict[int, float], b: dict[int, float], rel: float) -> None:
    assert sorted(a) == sorted(b)
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=rel), (step, a[step], b[step])


@pytest.mark.parametrize(("mode", "per_rank_batch", "rel"), [("ddp", 4, 1e-5), ("fsdp", 4, 1e-5), ("tp", 8, 1e-4),
                                                            ("pp", 8, 1e-5), ("fsdp+offload", 4, 1e-5)])
def test_two_ranks_give_the_losses_of_one(prepared, one_rank, tmp_path, mode, per_rank_batch, rel):
    one = one_rank["cosine"]
    options = ["train.parallel.mode=fsdp", "train.parallel.cpu_offload=true"] if mode == "fsdp+offload" else [
        f"train.parallel.mode={mode}"]
    two = train(clone(prepared, tmp_path / mode), 2, f"train.batch_size={per_rank_batch}", *options)
    close(two, one, rel)
    assert len(one) == 6


@pytest.mark.parametrize(("first", "second"), [(("fsdp", 2), ("none", 1)), (("none", 1), ("ddp", 2)),
                                               (("ddp", 2), ("fsdp", 2))])
def test_dcp_checkpoints_resume_on_another_world_size_and_layout(prepared, one_rank, tmp_path, first, second):
    whole, flat = one_rank["constant"], FLAT
    out = clone(prepared, tmp_path / "resharded")
    (mode1, n1), (mode2, n2) = first, second
    train(out, n1, f"train.batch_size={8 // n1}", f"train.parallel.mode={mode1}", "train.max_steps=4",
          "train.parallel.checkpoint_format=dcp", flat)
    resumed = train(out, n2, f"train.batch_size={8 // n2}", f"train.parallel.mode={mode2}",
                    "train.parallel.checkpoint_format=dcp", flat)
    close({s: resumed[s] for s in (5, 6)}, {s: whole[s] for s in (5, 6)}, 1e-5)


def test_eval_and_export_read_a_sharded_checkpoint(prepared, tmp_path):
    out = clone(prepared, tmp_path / "sharded")
    train(out, 2, "train.batch_size=4", "train.parallel.mode=fsdp", "train.max_steps=2")
    ckpt = out / "checkpoints" / "step_00000002"
    assert (ckpt / "dcp").is_dir() and not (ckpt / "model.safetensors").exists()
    args = [f"out_dir={out}", "data.filters=[]", *COMMON, "eval.max_tokens=2000", "eval.generate.max_new_tokens=4"]
    assert main(["eval", *args]) == 0
    assert main(["export", *args]) == 0  # verified against transformers, consolidated from the shards
    assert (out / "export" / "hf" / "model.safetensors").is_file()
