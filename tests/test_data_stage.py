"""The data stage as tasks and rounds (D7/D9): the same bytes on any worker count and after a crash
and rerun, every document accounted for across filters, PII and the three dedup kinds, dedup alarms
stopping the stage before output is written, and bad records quarantined with file and line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.config import DataConfig, InputConfig
from lmforge.data import rounds
from lmforge.data.dedup import DedupAlarm
from lmforge.data.pipeline import run_data_stage
from lmforge.recipe import load_config as parse_config

WORDS = ["the", "model", "reads", "data", "and", "learns", "what", "comes", "next", "in", "order", "to", "write",
         "text", "that", "people", "want", "read", "while", "tokens", "flow", "through", "layers", "of", "attention",
         "feed", "forward", "networks"]
ZH = "我们的数据清洗流程是在预训练之前完成的也有很多步骤和细节需要注意这是一个关于语言模型的故事"
STEPS = [{"name": "min_words", "min_words": 20}, "pii"]
DEDUP = ["exact", {"name": "minhash", "max_removed_share": None}, {"name": "substring", "min_bytes": 60}]


def prose(rng: random.Random, n: int = 80) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def corpus(root: Path, files: int = 4, per_file: int = 12, seed: int = 0) -> list[InputConfig]:
    """Files with exact copies, near copies, shared boilerplate, PII, Chinese and junk across them."""
    rng = random.Random(seed)
    shared = [prose(rng) for _ in range(3)]
    boiler = "Subscribe to our newsletter for weekly updates on models, data and training runs today."
    for f in range(files):
        lines = []
        for i in range(per_file):
            kind = rng.choice(["prose", "exact", "near", "boiler", "pii", "zh", "short"])
            text = {
                "prose": lambda: prose(rng),
                "exact": lambda: rng.choice(shared),
                "near": lambda: rng.choice(shared).replace("the", "a", 1),
                "boiler": lambda: prose(rng) + " " + boiler,
                "pii": lambda: prose(rng) + " write to jane.doe@example.com or call +1 415 555 0100",
                "zh": lambda: ZH * 2 + "联系邮箱至x@163.com",
                "short": lambda: "too short",
            }[kind]()
            lines.append(json.dumps({"id": f"{f}-{i}", "text": text}, ensure_ascii=False))
        (root / f"part{f}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [InputConfig(path=str(root / f"part{f}.jsonl"), source="web") for f in range(files)]


def stage(root: Path, inputs: list[InputConfig], out: str, **options) -> dict:
    cfg = DataConfig(inputs=inputs, filters=STEPS, dedup=DEDUP, docs_per_shard=5, val_fraction=0.2, **options)
    return run_data_stage(cfg, root / out, progress=False)


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_one_worker_and_two_workers_write_the_same_bytes(tmp_path):
    inputs = corpus(tmp_path)
    one = stage(tmp_path, inputs, "one", workers=1)
    two = stage(tmp_path, inputs, "two", workers=2)
    assert snapshot(tmp_path / "one") == snapshot(tmp_path / "two")
    assert one["table"] == two["table"]
    steps = one["ledger"]["steps"]
    assert steps == ["read", "min_words", "pii", "exact_dedup", "minhash_dedup", "substring_dedup"]
    counts = one["ledger"]["counts"]
    assert all(counts[s]["web"]["docs_removed"] > 0 for s in ("min_words", "exact_dedup")), counts
    assert one["ledger"]["dedup"]["minhash"]["docs"] == counts["minhash_dedup"]["web"]["docs_in"]
    assert not (tmp_path / ".one.work").exists(), "the work directory goes once the output is in place"


def test_a_crashed_stage_reruns_only_unfinished_tasks_to_the_same_bytes(tmp_path, monkeypatch):
    inputs = corpus(tmp_path)
    stage(tmp_path, inputs, "clean", workers=1)
    real = rounds._split
    calls = []

    def crash_on_task_2(cfg, docs, out, seed, task):
        calls.append(task)
        if task == 2:
            raise OSError("simulated crash in task 2")
        return real(cfg, docs, out, seed, task)

    monkeypatch.setattr(rounds, "_split", crash_on_task_2)
    with pytest.raises(OSError, match="simulated crash"):
        stage(tmp_path, inputs, "out", workers=1)
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.work").is_dir()
    calls.clear()
    monkeypatch.setattr(rounds, "_split", lambda *a: (calls.append(a[-1]), real(*a))[1])
    stage(tmp_path, inputs, "out", workers=1)
    assert calls == [2, 3], "tasks 0 and 1 of the last round were complete and are not redone"
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "clean")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), files=st.integers(1, 3))
def test_every_document_is_kept_or_removed_exactly_once(tmp_path_factory, seed, files):
    root = tmp_path_factory.mktemp("acc")
    inputs = corpus(root, files=files, per_file=10, seed=seed)
    lines = [json.loads(x) for i in inputs for x in Path(i.path).read_text(encoding="utf-8").splitlines()]
    if len({x["text"] for x in lines if len(x["text"]) > 40}) < 2:
        return  # nothing can survive to make a split: covered by the stage's own error tests
    try:
        summary = stage(root, inputs, "out", workers=1)
    except Exception as e:  # a corpus where fewer than two documents survive is refused, not lost
        assert "survived" in str(e)
        return
    out = root / "out"
    kept = [d for split in ("train", "val") for d in _docs(out / split)]
    removed = [json.loads(x) for x in (out / "removed.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted([d["id"] for d in kept] + [r["id"] for r in removed]) == sorted(x["id"] for x in lines)
    assert summary["docs_in"] == len(lines) == summary["docs_kept"] + summary["docs_removed"]
    removed_by = {step: {r["id"] for r in removed if r["step"] == step} for step in summary["ledger"]["steps"]}
    for r in removed:
        assert r["detail"]["file"] and r["detail"]["line"], r
        if r["step"] in ("exact_dedup", "minhash_dedup"):  # the kept copy survived that step (a later one may cut it)
            assert r["detail"]["kept_id"] not in removed_by[r["step"]], r


def _docs(split: Path) -> list[dict]:
    import zstandard

    out = []
    for shard in sorted(split.glob("shard-*.jsonl.zst")):
        with open(shard, "rb") as f:
            data = zstandard.ZstdDecompressor().stream_reader(f).read()
        out += [json.loads(x) for x in data.decode("utf-8").splitlines()]
    return out


def test_a_dedup_alarm_stops_the_stage_before_any_output(tmp_path):
    inputs = corpus(tmp_path)
    stage(tmp_path, inputs, "out", workers=1)
    before = snapshot(tmp_path / "out")
    cfg = DataConfig(inputs=inputs, filters=[], dedup=[{"name": "minhash", "max_cluster": 1}])
    with pytest.raises(DedupAlarm, match="over max_cluster=1"):
        run_data_stage(cfg, tmp_path / "out", progress=False)
    assert snapshot(tmp_path / "out") == before
    big = corpus(tmp_path, files=2, per_file=60, seed=1)  # 120 documents: the share alarm's floor is 100
    cfg = DataConfig(inputs=big, filters=[], dedup=["exact"], max_dedup_share=0.01)
    with pytest.raises(DedupAlarm, match=r"exact_dedup would remove \d+ of 120 documents .* of source 'web'"):
        run_data_stage(cfg, tmp_path / "out", progress=False)
    assert snapshot(tmp_path / "out") == before


def test_bad_records_are_quarantined_with_file_line_and_reason(tmp_path):
    good = [json.dumps({"id": f"g{i}", "text": " ".join(["the data"] * 20) + str(i)}) for i in range(4)]
    bad = ['{"id": "sur", "text": "broken \\ud83d emoji"}', json.dumps({"id": "nul", "text": "a\x00b"}),
           json.dumps({"id": "big", "text": "x" * 5000})]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(good[:2] + bad + good[2:]) + "\n", encoding="utf-8")
    cfg = DataConfig(inputs=[InputConfig(path=str(path))], filters=[], dedup=[], max_doc_bytes=4000)
    summary = run_data_stage(cfg, tmp_path / "out", progress=False)
    removed = {r["id"]: r for r in map(json.loads, (tmp_path / "out" / "removed.jsonl").read_text().splitlines())}
    assert removed["sur"]["detail"] == {"file": str(path), "line": 3, "problem": removed["sur"]["detail"]["problem"]}
    assert "lone surrogate" in removed["sur"]["detail"]["problem"]
    assert removed["nul"]["detail"]["problem"] == "text holds NUL bytes"
    assert "exceeds data.max_doc_bytes=4,000" in removed[f"{path.name}:5"]["detail"]["problem"]
    assert summary["docs_kept"] == 4 and summary["docs_removed"] == 3


def test_recipe_keys_take_bare_step_names(tmp_path):
    cfg = parse_config(None, ["data.filters=[pii, langid]", "data.dedup=[minhash]", "data.workers=2"])
    assert cfg.data.filters == ["pii", "langid"] and cfg.data.dedup == ["minhash"]
    assert [s.name for s in rounds.build_dedup(cfg.data)] == ["minhash"]
    assert parse_config(None, ["data.dedup=none"]).data.dedup == []
    with pytest.raises(Exception, match=r"data\.dedup\[0\]\.bandz: unknown option"):
        rounds.build_dedup(parse_config(None, ["data.dedup=[{name: minhash, bandz: 3}]"]).data)


@pytest.mark.slow
def test_ray_executor_writes_what_the_local_one_writes(tmp_path):
    ray = pytest.importorskip("ray")
    inputs = corpus(tmp_path)
    stage(tmp_path, inputs, "local", workers=2)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        stage(tmp_path, inputs, "ray", executor="ray")
    finally:
        ray.shutdown()
    assert snapshot(tmp_path / "ray") == snapshot(tmp_path / "local")


@pytest.mark.slow
def test_sigkill_mid_stage_then_rerun_gives_the_same_bytes(tmp_path):
    """`kill -9` of `lmforge data` (2 worker processes) at several points; each rerun resumes from the
    completed tasks and the final output equals an uninterrupted run's, byte for byte."""
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "in").mkdir()
    corpus(tmp_path / "in", files=8, per_file=400)
    args = [sys.executable, "-m", "lmforge", "data", "--quiet", f"data.inputs={tmp_path / 'in'}",
            "data.filters=[{name: min_words, min_words: 20}, pii]", "data.workers=2",
            "data.dedup=[exact, {name: minhash, max_removed_share: null}, {name: substring, min_bytes: 60}]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    clean = subprocess.run([*args, f"out_dir={tmp_path / 'clean'}"], env=env, capture_output=True, timeout=600)
    assert clean.returncode == 0, clean.stderr.decode()[-2000:]
    out = f"out_dir={tmp_path / 'run'}"
    for delay in (1.5, 3.0, 4.5):
        proc = subprocess.Popen([*args, out], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)  # the workers too
        proc.wait()
    done = subprocess.run([*args, out], env=env, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert snapshot(tmp_path / "run" / "data") == snapshot(tmp_path / "clean" / "data")


def test_plan_dedup_and_train_classifier_commands(tmp_path, capsys):
    from lmforge.cli import main

    assert main(["plan-dedup", "--docs", "2000000", "data.dedup=[{name: minhash, bands: 9, rows: 13}]"]) == 0
    plan = capsys.readouterr().out
    assert "9 bands x 13 rows = 117 permutations" in plan and "Memory for 2,000,000 documents" in plan
    rng = random.Random(0)
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text("".join(json.dumps({"text": prose(rng, 40)}) + "\n" for _ in range(60)))
    bad.write_text("".join(json.dumps({"text": "buy cheap pills now " * 8}) + "\n" for _ in range(60)))
    out = tmp_path / "clf"
    assert main(["train-classifier", "--positive", str(good), "--negative", str(bad), "--out", str(out)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["heldout"]["accuracy"] >= 0.9 and (out / "classifier.json").is_file()
    bad.write_text('{"text": "fine"}\n{"txt": "no text key"}\n')
    assert main(["train-classifier", "--positive", str(good), "--negative", str(bad), "--out", str(out)]) == 1
    assert f"{bad}:2" in capsys.readouterr().err
