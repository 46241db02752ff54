"""T4 through the trainer: a curriculum's stage switch (a new mixture and a longer window) lands on
the same step, and the run gives the same losses, whether or not it was interrupted before the
switch, exactly at it, or after it and resumed from its checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lmforge.recipe import load_config
from lmforge.stages import stage_data, stage_tokenize, stage_tokenizer, stage_train

# Stage 0: web only, windows of 16 + 1 tokens, 4 rows a step: 68 tokens a step, 5 steps for 340.
CURRICULUM = ("tokens.curriculum=[{tokens: 340, seq_len: 16, mixture: {weights: {web: 1}}}, "
              "{tokens: 0, seq_len: 32, mixture: {weights: {web: 0.5, code: 0.5}}}]")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Documents, tokenizer and token sets, shared by every run (each run copies them)."""
    root = tmp_path_factory.mktemp("curriculum")
    rng = np.random.default_rng(0)
    words = {"web": ["the", "model", "reads", "data", "模型", "数据", "and", "learns"],
             "code": ["x", "=", "1;", "def", "f(x):", "return", "if", "else"]}
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "text": " ".join(rng.choice(words[src], 120)),
                                          "source": src}, ensure_ascii=False) + "\n"
                              for i, src in enumerate(["web", "code"] * 150)), encoding="utf-8")
    cfg = config(root / "base", f"data.inputs={corpus}")
    stage_data(cfg, progress=False)
    stage_tokenizer(cfg, progress=False)
    stage_tokenize(cfg, progress=False)
    return root / "base"


def config(out: Path, *overrides: str):
    return load_config(None, [f"out_dir={out}", "data.filters=[]", "data.val_fraction=0.1", "tokenizer.vocab_size=400",
                              "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32",
                              "train.seq_len=16", "train.batch_size=4", "train.max_steps=9", "train.checkpoint_every=1",
                              "train.log_every=1", "train.device=cpu", "train.schedule.warmup_steps=2",
                              "eval.every=0", CURRICULUM, *overrides])


def copy_inputs(prepared: Path, out: Path) -> None:
    for part in ("data", "tokenizer", "tokens"):
        shutil.copytree(prepared / part, out / part)


def metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


@pytest.mark.parametrize("stop_after", [3, 5, 7])  # inside stage 0, at the switch (step 6 is stage 1's first), after
def test_interrupted_and_resumed_runs_equal_the_uninterrupted_one(prepared, tmp_path, stop_after):
    whole = tmp_path / "whole"
    copy_inputs(prepared, whole)
    stage_train(config(whole), progress=False)
    full = metrics(whole)
    assert sorted(full) == list(range(1, 10))
    assert not any("loss/code" in full[s] for s in range(1, 6)), "stage 0 draws web only"
    assert all("loss/code" in full[s] for s in range(6, 10)), "stage 1 starts at step 6, with code"

    cut = tmp_path / "cut"
    copy_inputs(prepared, cut)
    stage_train(config(cut), progress=False, stop_after=stop_after)
    resumed = stage_train(config(cut), progress=False)
    assert resumed["resumed_from"] == stop_after and resumed["steps"] == 9
    again = metrics(cut)
    for step in range(1, 10):
        assert again[step]["loss"] == full[step]["loss"], f"step {step}"
