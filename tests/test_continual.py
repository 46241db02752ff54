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
    for name in ("general", "domain"):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"id": str(i), "text": " ".join(rng.choice(words, 60))}) + "\n" for i in range(150)))
    corpus = f"[{tmp_path / 'general.jsonl'}, {tmp_path / 'domain.jsonl'}]"
    base = tmp_path / "base"
    assert main(["run", f"out_dir={base}", f"data.inputs={tmp_path / 'general.jsonl'}", "train.max_steps=30",
                 "--quiet", *TINY]) == 0
    hf = base / "export" / "hf"
    cont = tmp_path / "cont"
    # Domain text with a replay of general data: a curriculum stage's mixture.
    replay = "tokens.curriculum=[{tokens: 0, seq_len: 32, mixture: {weights: {domain: 0.7, general: 0.3}}}]"
    args = [f"out_dir={cont}", f"data.inputs={corpus}", f"train.init_from={hf}", f"tokenizer.from={hf}",
            "train.max_steps=5", "model.n_layers=7", replay, *TINY]  # the model section is the checkpoint's
    assert main(["run", "--quiet", *args]) == 0
    first, trained = losses(cont)[1], losses(base)
    assert first < 0.8 * trained[1], "step 1 starts from the trained weights, not from a fresh init"
    assert abs(first - trained[30]) < 0.25 * trained[30]
    records = [json.loads(x) for x in (cont / "metrics.jsonl").read_text().splitlines()]
    assert all({"loss/domain", "loss/general"} <= set(r) for r in records if "loss" in r), "both sources drawn"
    saved = (cont / "config.yaml").read_text()
    assert "n_layers: 2" in saved and "n_layers: 7" not in saved
    assert (cont / "export" / "hf" / "model.safetensors").is_file()
