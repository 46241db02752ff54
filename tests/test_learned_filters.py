"""Learned filters: the hashed n-gram classifier (training, held-out accuracy, save/load, bad input),
the `quality_classifier` / `toxicity` rules at document and sentence granularity, a cascade behind a
cheap rule, and the `perplexity` rule over a tiny LM trained here through lmforge's own CLI."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.config import ConfigError
from lmforge.data.classifier import CONFIG_FILE, WEIGHTS_FILE, load_classifier, train_classifier
from lmforge.data.document import Document
from lmforge.data.filters import build_filter
from lmforge.data.filters.learned import QualityClassifier, Toxicity, sentence_pieces
from lmforge.data.ledger import Ledger

SUBJ = ["The committee", "My grandmother", "A young engineer", "The river", "Our small village", "The old library",
        "Every student", "The research team", "A quiet neighbour", "The city council"]
VERB = ["described", "remembered", "carefully studied", "slowly rebuilt", "often visited", "openly discussed",
        "patiently explained", "finally understood", "gladly shared", "quietly observed"]
OBJ = ["the history of the bridge", "a letter from her brother", "the results of the survey", "the autumn harvest",
       "how the machine worked", "the changes in the weather", "the plans for the new school", "an old map"]
TAIL = ["before the winter came.", "with great attention to detail.", "during the long evening.",
        "because it mattered to everyone.", "after several months of work.", "while the others listened."]
ZH_PROSE = ["我们在周末去了图书馆，读了很多关于历史的书。", "老师耐心地解释了这个问题的来龙去脉。",
            "这座城市的河流在春天变得非常美丽。", "研究小组花了几个月的时间完成了这项调查。",
            "祖母常常给我们讲她年轻时候的故事。", "村里的人们一起修建了一座新的学校。"]
SPAM = ["buy", "cheap", "free", "casino", "win", "click", "here", "best", "price", "discount", "pills", "loans",
        "bonus", "offer", "deal", "now", "limited", "crypto", "jackpot", "sale"]
ZH_SPAM = ["免费", "下载", "彩票", "中奖", "点击", "优惠", "代购", "私服", "赌场", "返利", "秒杀", "特价"]


def en_sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJ)} {rng.choice(VERB)} {rng.choice(OBJ)} {rng.choice(TAIL)}"


def prose(rng: random.Random) -> str:
    if rng.random() < 0.4:
        return "".join(rng.choice(ZH_PROSE) for _ in range(rng.randint(2, 4)))
    return " ".join(en_sentence(rng) for _ in range(rng.randint(2, 4)))


def spam(rng: random.Random) -> str:
    if rng.random() < 0.4:
        return " ".join(rng.choice(ZH_SPAM) for _ in range(rng.randint(6, 15)))
    return " ".join(rng.choice(SPAM) for _ in range(rng.randint(6, 15))) + "!!!"


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def doc(text: str, id: str = "d") -> Document:
    return Document(id=id, text=text, source="web")


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("examples")
    # Label noise: 3% of each file is the other class, as in real annotated data.
    rng = random.Random(0)
    pos = [spam(rng) if rng.random() < 0.03 else prose(rng) for _ in range(500)]
    neg = [prose(rng) if rng.random() < 0.03 else spam(rng) for _ in range(500)]
    return write_jsonl(root / "good.jsonl", pos), write_jsonl(root / "bad.jsonl", neg)


@pytest.fixture(scope="module")
def quality_model(examples, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("quality") / "model"
    return out, train_classifier([examples[0]], [examples[1]], out, buckets=1 << 18, seed=0)


# ---------------------------------------------------------------- classifier


def test_classifier_reaches_high_heldout_accuracy_in_both_languages(quality_model):
    out, metrics = quality_model
    assert metrics["positive"] == metrics["negative"] == 500
    assert metrics["heldout"]["n"] == 100 and metrics["train"]["n"] == 900
    assert metrics["heldout"]["accuracy"] >= 0.9  # the 3% label noise caps it near 0.97
    model = load_classifier(out)
    rng = random.Random(99)  # fresh texts, never seen in training
    assert model.score(" ".join(en_sentence(rng) for _ in range(3))) > 0.8
    assert model.score("".join(ZH_PROSE[:3])) > 0.8
    assert model.score("cheap casino bonus click now!!!") < 0.2
    assert model.score("免费 下载 彩票 中奖 点击 秒杀") < 0.2


def test_save_load_round_trip_scores_identically_and_training_is_repeatable(quality_model, examples, tmp_path):
    out, metrics = quality_model
    again = train_classifier([examples[0]], [examples[1]], tmp_path / "again", buckets=1 << 18, seed=0)
    assert (tmp_path / "again" / WEIGHTS_FILE).read_bytes() == (out / WEIGHTS_FILE).read_bytes()
    assert again["heldout"] == metrics["heldout"]
    loaded, reloaded = load_classifier(out), load_classifier(tmp_path / "again")
    texts = ["The river remembered the autumn harvest.", "win free pills", "祖母常常给我们讲故事。", ""]
    assert [loaded.score(t) for t in texts] == [reloaded.score(t) for t in texts]
    meta = json.loads((out / CONFIG_FILE).read_text())
    assert meta["features"]["buckets"] == 1 << 18 and meta["training"]["seed"] == 0
    assert meta["metrics"]["heldout"] == metrics["heldout"]


def test_mismatched_weights_file_is_refused(quality_model, tmp_path):
    out, _ = quality_model
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / CONFIG_FILE).write_bytes((out / CONFIG_FILE).read_bytes())
    blob = bytearray((out / WEIGHTS_FILE).read_bytes())
    blob[-1] ^= 0xFF
    (copy / WEIGHTS_FILE).write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="sha256 differs"):
        load_classifier(copy)


def test_bad_jsonl_names_the_file_and_line(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", ["fine text"] * 3)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n\n{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.jsonl:4: not valid JSON"):
        train_classifier([good], [broken], tmp_path / "m", buckets=1 << 10)
    missing = write_jsonl(tmp_path / "missing.jsonl", ["a", "b"], key="body")
    with pytest.raises(ValueError, match=r"missing\.jsonl:1: expected an object with a string 'text' field"):
        train_classifier([good], [missing], tmp_path / "m", buckets=1 << 10)
    good_body = write_jsonl(tmp_path / "good_body.jsonl", ["fine text"] * 3, key="body")
    metrics = train_classifier([good_body], [missing], tmp_path / "m", text_key="body", buckets=1 << 10, holdout=0)
    assert (metrics["positive"], metrics["negative"], metrics["heldout"]["n"]) == (3, 2, 0)


# ---------------------------------------------------------------- rules


def test_quality_filter_keeps_prose_and_drops_spam_with_the_score(quality_model):
    step = build_filter({"name": "quality_classifier", "path": str(quality_model[0]), "min_score": 0.5}, 0)
    rng = random.Random(7)
    kept, reason = step.rule.process(doc(prose(rng)))
    assert reason == "" and kept.meta["quality_score"] > 0.5
    dropped, reason = step.rule.process(doc("best price cheap loans click here now"))
    assert dropped is None and reason.startswith("quality=0.") and reason.endswith("<0.5")


def test_toxicity_drops_at_or_above_max_score(quality_model):
    # The spam model stands in for a toxicity model: "toxic" is whatever was the positive class.
    rule = Toxicity(str(quality_model[0]), max_score=0.5)
    good = "The old library quietly observed the plans for the new school."
    new, reason = rule.process(doc(good))
    assert new is None and reason.startswith("toxicity=") and reason.endswith(">=0.5")
    kept, _ = rule.process(doc("cheap casino bonus now"))
    assert kept is not None and kept.meta["toxicity_score"] < 0.5


def test_sentence_granularity_removes_only_the_bad_sentences(quality_model):
    rule = QualityClassifier(str(quality_model[0]), granularity="sentence")
    good1 = "The committee patiently explained the results of the survey."
    good2 = "我们在周末去了图书馆，读了很多关于历史的书。"
    bad = "Buy cheap pills casino bonus click here now!"
    text = f"{good1} {bad}\n{good2}"
    new, reason = rule.process(doc(text))
    assert reason == "" and new.text == f"{good1} {good2}"
    assert new.meta["quality_score_sentences_removed"] == 1
    assert rule.process(doc(f"{bad} {bad}")) == (None, "quality: all 2 sentences <0.5")
    assert rule.process(doc(f"{good1}\n\n{bad}"))[0].text == good1  # no dangling separator


def test_sentence_pieces_rejoin_to_the_original_text():
    text = "  One. Two?\n\nThree!  四。五？ six"
    pieces = sentence_pieces(text)
    assert "".join(pieces) == text and len(pieces) == 6


def test_bad_classifier_options_name_the_key(tmp_path, quality_model):
    with pytest.raises(ConfigError, match=r"^data.filters\[1\].path: .*classifier.json not found"):
        build_filter({"name": "quality_classifier", "path": str(tmp_path)}, 1)
    with pytest.raises(ConfigError, match=r"^data.filters\[0\].granularity: expected one of document, sentence"):
        build_filter({"name": "toxicity", "path": str(quality_model[0]), "granularity": "paragraph"}, 0)
    with pytest.raises(ConfigError, match=r"^data.filters\[0\].min_score: is a probability"):
        build_filter({"name": "quality_classifier", "path": str(quality_model[0]), "min_score": 2}, 0)


def test_cascade_cheap_rule_first_then_classifier(quality_model, tmp_path):
    steps = [build_filter({"name": "min_words", "min_words": 5}, 0),
             build_filter({"name": "quality_classifier", "path": str(quality_model[0])}, 1)]
    rng = random.Random(3)
    docs = [doc("too short", "a"), doc(prose(rng), "b"), doc("cheap casino bonus click here now today", "c")]
    with Ledger(tmp_path / "removed.jsonl") as ledger:
        stream = iter(docs)
        for step in steps:
            stream = step(stream, ledger)
        kept = list(stream)
    assert [d.id for d in kept] == ["b"] and "quality_score" in kept[0].meta
    removed = [json.loads(line) for line in (tmp_path / "removed.jsonl").read_text().splitlines()]
    assert [(r["id"], r["step"]) for r in removed] == [("a", "min_words"), ("c", "quality_classifier")]


# ---------------------------------------------------------------- perplexity


TINY = ["tokenizer.vocab_size=400", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64",
        "train.seq_len=32", "train.batch_size=8", "train.max_steps=120", "train.checkpoint_every=60",
        "train.schedule.warmup_steps=5", "train.optimizer.lr=3e-3", "train.device=cpu", "data.filters=[]"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A decoder trained for a few seconds on templated English prose, through the CLI."""
    root = tmp_path_factory.mktemp("lm")
    rng = random.Random(1)
    corpus = write_jsonl(root / "corpus.jsonl", [" ".join(en_sentence(rng) for _ in range(6)) for _ in range(300)])
    run = root / "run"
    for stage in ("data", "tokenizer", "tokenize", "train"):
        assert main([stage, "--quiet", f"out_dir={run}", f"data.inputs={corpus}", *TINY]) == 0
    return run


def test_perplexity_band_keeps_in_domain_text_and_drops_noise(tiny_run):
    rule = build_filter({"name": "perplexity", "checkpoint": str(tiny_run)}, 0).rule
    rng = random.Random(5)
    in_domain = " ".join(en_sentence(rng) for _ in range(4))
    noise = " ".join("".join(rng.choice("qxzjvkwy") for _ in range(rng.randint(3, 8))) for _ in range(30))
    ppl_in, _ = rule.scorer.perplexity(in_domain, rule.max_tokens)
    ppl_noise, _ = rule.scorer.perplexity(noise, rule.max_tokens)
    assert ppl_in * 5 < ppl_noise
    band = float(np.sqrt(ppl_in * ppl_noise))
    banded = build_filter({"name": "perplexity", "checkpoint": str(tiny_run), "max": band}, 0).rule
    kept, _ = banded.process(doc(in_domain))
    assert kept.meta["perplexity"] == pytest.approx(ppl_in, rel=1e-3)
    dropped, reason = banded.process(doc(noise))
    assert dropped is None and reason.startswith("perplexity=") and reason.endswith(f">{band:g}")
    high_floor = build_filter({"name": "perplexity", "checkpoint": str(tiny_run), "min": band}, 0).rule
    assert high_floor.process(doc(in_domain))[1].endswith(f"<{band:g}")
    assert banded.process(doc("")) == (None, "perplexity: no tokens")


def test_perplexity_accepts_a_checkpoint_directory_and_rejects_other_paths(tiny_run, tmp_path):
    ckpt = tiny_run / "checkpoints" / "step_00000060"
    text = "The river remembered the autumn harvest before the winter came."
    by_run = build_filter({"name": "perplexity", "checkpoint": str(tiny_run)}, 0).rule
    by_ckpt = build_filter({"name": "perplexity", "checkpoint": str(ckpt)}, 0).rule
    assert by_ckpt.scorer.checkpoint == ckpt and by_run.scorer.checkpoint.name == "step_00000120"
    assert by_ckpt.scorer.perplexity(text, 64)[0] != by_run.scorer.perplexity(text, 64)[0]
    # Past max_tokens the text is not read; longer than the context, it is scored in windows.
    long_text = " ".join([text] * 20)
    assert by_run.scorer.perplexity(long_text, 10)[1] == 10
    assert by_run.scorer.perplexity(long_text, 1000)[1] > 64
    with pytest.raises(ConfigError, match=r"^data.filters\[0\].checkpoint: .* neither an lmforge run directory"):
        build_filter({"name": "perplexity", "checkpoint": str(tmp_path)}, 0)


def test_data_workers_import_no_torch():
    """Every data worker (spawned) imports the rule registry; torch alone would add ~1 s to each."""
    code = "import sys, lmforge.data.rounds; assert 'torch' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
