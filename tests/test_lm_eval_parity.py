"""E2: our zero-shot harness against lm-evaluation-harness itself (`lm_eval --model hf` on the
exported model, offline, a local task over the same JSONL): acc and acc_norm agree within 0.5 points
(they came out identical, as do the standard errors). lm-eval is a dev extra; slow: ~1 minute."""

from __future__ import annotations

import json
import os

import pytest

from lmforge.cli import main

pytestmark = pytest.mark.slow


def test_acc_matches_lm_evaluation_harness(tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    from lm_eval.tasks import TaskManager

    run = tmp_path / "run"
    tiny = [f"out_dir={run}", "data.builtin.max_prose_bytes=400000", "data.builtin.max_code_bytes=100000",
            "data.val_fraction=0.1", "tokenizer.vocab_size=1024", "model.d_model=64", "model.n_layers=2",
            "model.n_heads=4", "train.max_steps=40", "train.seq_len=128", "eval.max_tokens=5000",
            "eval.tasks=[builtin]", "eval.generate.max_new_tokens=4", "train.device=cpu"]
    assert main(["run", "--config", "recipes/demo.yaml", "--quiet", *tiny]) == 0
    ours = json.loads((run / "eval.json").read_text())["zero_shot"]["builtin_continuation"]
    task = run / "eval" / "tasks" / "builtin_continuation.jsonl"
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "parity.yaml").write_text("\n".join([
        "task: lmforge_parity", "dataset_path: json", f"dataset_kwargs: {{data_files: {{test: '{task}'}}}}",
        "test_split: test", "output_type: multiple_choice", 'doc_to_text: "{{context}}"',
        'doc_to_choice: "{{choices}}"', "doc_to_target: gold", 'target_delimiter: ""',
        "metric_list: [{metric: acc}, {metric: acc_norm}]"]))
    monkeypatch.setitem(os.environ, "HF_DATASETS_OFFLINE", "1")
    monkeypatch.setitem(os.environ, "HF_HUB_OFFLINE", "1")
    # add_bos_token: lm-eval then puts the tokenizer's BOS (our end-of-document token) before each
    # context, as lmforge does, since every training document follows one.
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={run / 'export' / 'hf'},dtype=float32,add_bos_token=True",
        tasks=["lmforge_parity"], device="cpu", batch_size=8,
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")))["results"]["lmforge_parity"]
    assert results["sample_len"] == ours["n"] >= 20
    assert abs(results["acc,none"] - ours["acc"]) <= 0.005
    assert abs(results["acc_norm,none"] - ours["acc_norm"]) <= 0.005
