"""E1: validation loss per source during training (eval.every) and `lmforge eval` over a list of
checkpoints (a table, eval_checkpoints.json and a loss-vs-tokens plot)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmforge.cli import main

TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=64", "train.seq_len=32",
        "train.batch_size=8", "train.log_every=1", "train.schedule.warmup_steps=2", "train.optimizer.lr=3e-3",
        "tokenizer.vocab_size=400", "train.device=cpu", "data.filters=[]", "eval.max_tokens=2000",
        "train.max_steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=5"]


def test_periodic_validation_and_a_checkpoint_sweep(tmp_path, capsys):
    rng = np.random.default_rng(0)
    words = ["the", "model", "reads", "data", "and", "learns", "what", "comes", "next"]
    for name in ("web", "books"):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"id": str(i), "text": " ".join(rng.choice(words, 50))}) + "\n" for i in range(200)))
    run = tmp_path / "run"
    args = [f"out_dir={run}", f"data.inputs=[{tmp_path / 'web.jsonl'}, {tmp_path / 'books.jsonl'}]", *TINY]
    for stage in ("data", "tokenizer", "tokenize"):
        assert main([stage, "--quiet", *args]) == 0
    assert main(["train", "--quiet", *args, "eval.every=2", "eval.every_tokens=500"]) == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all({"val_loss/web", "val_loss/books"} <= set(r) for r in evals)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6], "training records are unchanged"

    capsys.readouterr()
    assert main(["eval", "--quiet", *args, "eval.checkpoints=all"]) == 0
    table = capsys.readouterr().out
    rows = json.loads((run / "eval_checkpoints.json").read_text())
    assert [r["step"] for r in rows] == [2, 4, 6] and (run / "eval_checkpoints.png").is_file()
    assert rows[0]["tokens"] < rows[-1]["tokens"] and "books" in table
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["loss"])
    assert main(["eval", "--quiet", *args, "eval.checkpoints=[2, 9]"]) == 2
    assert "'9' is not a checkpoint" in capsys.readouterr().err


def test_eval_reports_zero_shot_tasks_with_contamination(tmp_path, capsys):
    rng = np.random.default_rng(1)
    words = ["the", "model", "reads", "data", "and", "learns", "what", "comes", "next", "in", "order", "to"]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "text": " ".join(rng.choice(words, 60))}) + "\n"
                              for i in range(300)))
    task = tmp_path / "mine.jsonl"
    task.write_text("\n".join(json.dumps({"id": str(i), "context": "the model reads", "choices": [" data", " zzz"],
                                          "gold": 0}) for i in range(4)) + "\n" + '{"id": "bad", "choices": []}\n')
    run = tmp_path / "run"
    args = [f"out_dir={run}", f"data.inputs={corpus}", *TINY, "data.val_fraction=0.2"]
    assert main(["run", "--quiet", *args, f"eval.tasks=[builtin, {task}]"]) == 0
    metrics = json.loads((run / "eval.json").read_text())
    mine = metrics["zero_shot"]["mine"]
    assert mine["n"] == 4 and mine["skipped"] == 1 and f"{task}:5" in mine["problems"][0]
    assert 0 <= mine["acc"] <= 1 and "acc_norm_stderr" in mine
    assert metrics["zero_shot"]["builtin_continuation"]["n"] > 0
    assert metrics["contamination"]["mine"]["items"] == 4
