"""`lmforge tokenize` as a stage: train and val tokenized side by side on one pool of encoder threads
give the same bytes on any thread count, and a split that fails stops the other one and is the
error reported."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import numpy as np
import pytest

from lmforge.data import doc_shards
from lmforge.recipe import load_config
from lmforge.stages import RunPaths, stage_data, stage_tokenize, stage_tokenizer
from lmforge.tokenizer.report import tokenizer_report
from lmforge.tokens import token_sets
from lmforge.tokens.shard_writer import doc_batches


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tokenize")
    corpus = root / "corpus.jsonl"
    rng = np.random.default_rng(0)
    words = ["the", "model", "reads", "data", "模型", "数据", "tokens", "x = 1;", "learn", "next"]
    with corpus.open("w") as f:
        for i in range(600):
            f.write(json.dumps({"id": str(i), "text": " ".join(rng.choice(words, 80)),
                                "source": ["web", "code"][i % 2]}, ensure_ascii=False) + "\n")
    out = root / "run"
    cfg = config(out, corpus)
    stage_data(cfg, progress=False)
    stage_tokenizer(cfg, progress=False)
    return out


def config(out: Path, corpus: Path | None = None, *overrides: str):
    inputs = [f"data.inputs={corpus}"] if corpus else []
    return load_config(None, [f"out_dir={out}", *inputs, "data.filters=[]", "tokenizer.vocab_size=400",
                              "data.val_fraction=0.2", *overrides])


def token_files(out: Path) -> dict[str, bytes]:
    tokens = RunPaths(out).tokens
    return {str(p.relative_to(tokens)): p.read_bytes() for p in sorted(tokens.rglob("*")) if p.is_file()}


def test_any_thread_count_writes_the_same_token_sets(run_dir):
    assert (RunPaths(run_dir).tokenizer.parent / "tokenizer.tiktoken").is_file()  # the tokenizer stage's export
    one = stage_tokenize(config(run_dir, None, "tokens.threads=1"), progress=False)
    first = token_files(run_dir)
    three = stage_tokenize(config(run_dir, None, "tokens.threads=3"), progress=False)
    assert one == three and one["encoder"] == "tiktoken"
    assert token_files(run_dir) == first and len(first) > 8


def test_the_tokenizer_stage_reports_bytes_per_token_per_source_on_val(run_dir):
    cfg = config(run_dir)
    result = stage_tokenizer(cfg, progress=False)  # trains the same tokenizer again (same data, same seed)
    rows = result["bytes_per_token"]
    assert set(rows) == {"web", "code", "all"} and rows == tokenizer_report(cfg)["sources"]
    assert all(r["docs"] > 0 and r["bytes_per_token"] > 1.0 for r in rows.values())


def test_a_failing_split_stops_the_other_and_is_the_error_reported(run_dir, monkeypatch):
    real = doc_shards.read_documents
    read_from_train: list[str] = []

    def read(where, meta=True):
        if "val" in Path(where).parts:
            raise ValueError("val shard unreadable")
        for doc in real(where, meta):
            time.sleep(0.002)  # slow enough that val fails while train is still reading
            read_from_train.append(doc.id)
            yield doc

    monkeypatch.setattr(doc_shards, "read_documents", read)
    # Batches of 8 documents: the stop is seen at the next batch, well before train's ~480 are read.
    monkeypatch.setattr(token_sets, "doc_batches", functools.partial(doc_batches, max_docs=8))
    with pytest.raises(ValueError, match="val shard unreadable"):
        stage_tokenize(config(run_dir, None, "tokens.threads=2"), progress=False)
    total = json.loads((RunPaths(run_dir).data / "ledger.json").read_text())["totals"]["docs_kept"]
    assert 0 < len(read_from_train) < total * 0.5  # train stopped early
