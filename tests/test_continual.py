"""E4: continual pretraining through the CLI: `train.init_from` starts from an exported Hugging Face
Llama with its tokenizer (`tokenizer.from`), and the run's own export is checked like any export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lmforge.cli import main

TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=64", "train.seq_len=32",
        "train.batch_size=8", "train.checkpoint_every=10", "train.log_every=1", "train.schedule.warmup_steps=2",
        "train.optimizer.lr=3e-3", "tokenizer.vocab_size=400", "train.device=cpu", "data.filters=[]",
        "eval.max_tokens=2000", "eval.generate.max_new_tokens=4"]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_a_run_continues_from_an_exported_model_and_exports_again(tmp_path):
    rng = np.random.default_rng(0)
    words = ["the", "model", "reads", "data", "and", "learns", "what", "comes", "next", "in", "text"]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "text": " ".join(rng.choice(words, 60))}) + "\n"
                              for i in range(300)))
    base = tmp_path / "base"
    assert main(["run", f"out_dir={base}", f"data.inputs={corpus}", "train.max_steps=30", "--quiet", *TINY]) == 0
    hf = base / "export" / "hf"
    cont = tmp_path / "cont"
    args = [f"out_dir={cont}", f"data.inputs={corpus}", f"train.init_from={hf}", f"tokenizer.from={hf}",
            "train.max_steps=5", "model.n_layers=7", *TINY]  # the model section comes from the checkpoint
    assert main(["run", "--quiet", *args]) == 0
    first, trained = losses(cont)[1], losses(base)
    assert first < 0.8 * trained[1], "step 1 starts from the trained weights, not from a fresh init"
    assert abs(first - trained[30]) < 0.25 * trained[30]
    saved = (cont / "config.yaml").read_text()
    assert "n_layers: 2" in saved and "n_layers: 7" not in saved
    assert (cont / "export" / "hf" / "model.safetensors").is_file()
