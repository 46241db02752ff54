"""E8: the run report is one self-contained page rebuilt from a run's files; a missing part says so."""

from __future__ import annotations

import base64
import io
import json
import re

from matplotlib import image

from lmforge.cli import main
from lmforge.config import DataConfig, InputConfig
from lmforge.data.pipeline import run_data_stage
from lmforge.report import build_report


def test_report_inlines_every_part_and_names_what_is_missing(tmp_path):
    run = tmp_path / "run"
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "text": ("the data and the model " * 8) + str(i % 20)}) + "\n"
                              for i in range(40)))
    run_data_stage(DataConfig(inputs=[InputConfig(path=str(corpus))]), run / "data", progress=False)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5 - s / 10, "lr": 1e-3, "tokens": s,
                                                           "tokens_per_s": 100.0}) + "\n" for s in range(1, 11))
                                       + json.dumps({"step": 10, "tokens": 10, "val_loss": 4.2}) + "\n")
    (run / "eval.json").write_text(json.dumps({
        "objective": "lm", "loss": 4.1, "perplexity": 60.3, "loss_at_init": 8.0, "unigram_loss": 6.0,
        "sources": {"c": {"loss": 4.1, "perplexity": 60.3, "tokens": 100}}, "prompt": "def ", "sample": "<b>x</b>",
        "zero_shot": {"mine": {"n": 10, "acc": 0.4, "acc_stderr": 0.16, "acc_norm": 0.5, "acc_norm_stderr": 0.17}},
        "contamination": {"mine": {"share": 0.1}}}))
    page = build_report(run).read_text()
    for title in ("Data", "Tokenizer and tokens", "Training", "Validation", "Zero-shot tasks", "Sample", "Export"):
        assert f"<h2>{title}</h2>" in page
    assert "tokens/train.json: not produced" in page and "export/check.json: not produced" in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page, "run output is escaped, never markup"
    pngs = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(pngs) == 2  # the data chart and the training curves
    assert all(image.imread(io.BytesIO(base64.b64decode(p)), format="png").shape[0] > 50 for p in pngs)
    assert "src='http" not in page and "<script" not in page, "self-contained"
    assert main(["report", f"out_dir={run}"]) == 0
