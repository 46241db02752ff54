"""E6: fine-tuning with a classification head, on tiny runs of every family and a labelled set whose
label is a topic given away by keywords, in English and Chinese."""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.config import ConfigError, TokenizerConfig, to_dict
from lmforge.finetune import (
    Classifier,
    LabelledDataError,
    add_cli_parser,
    cli_main,
    finetune,
    load_classifier,
    pool,
    predict,
)
from lmforge.finetune.data import frame_rows, pad_rows, stratified_split
from lmforge.models import build_model
from lmforge.recipe import load_config
from lmforge.stages import RunPaths, load_trained
from lmforge.tokenizer.special_tokens import load_special_tokens
from lmforge.tokenizer.train import train_tokenizer
from lmforge.train.checkpoint import save_checkpoint

VOCAB = 500
SHAPE = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64", "train.seq_len=64"]
FAMILIES = {
    "decoder": ["model.arch=decoder"],
    "encoder": ["model.arch=encoder", "objective.name=mlm"],
    "t5": ["model.arch=encoder_decoder", "objective.name=span_corruption"],
    "bart": ["model.arch=encoder_decoder", "model.variant=bart", "objective.name=bart"],
}
TOPICS = {
    "sport": (["football", "goal", "team", "match", "player", "stadium"], ["足球", "比赛", "球队", "进球", "球员"]),
    "food": (["recipe", "soup", "flour", "kitchen", "spice", "bake"], ["厨房", "面粉", "汤", "烹饪", "食谱"]),
    "rain": (["weather", "storm", "cloud", "umbrella", "wind", "forecast"], ["天气", "暴雨", "云", "雨伞", "大风"]),
}
FILLER = (["the", "today", "we", "saw", "a", "very", "new", "in", "city", "about", "and", "old"],
          ["今天", "我们", "一个", "非常", "城市", "新的", "关于", "和", "老的"])
FT = dict(epochs=8, lr=3e-3, batch_size=16, max_len=48)  # tiny models from scratch learn at a high lr


def topic_text(rng: random.Random, topic: str) -> str:
    """Filler words shared by every topic with two of the topic's keywords among them; half Chinese."""
    lang = rng.randrange(2)
    words = [rng.choice(FILLER[lang]) for _ in range(rng.randint(4, 9))]
    for _ in range(2):
        words.insert(rng.randrange(len(words) + 1), rng.choice(TOPICS[topic][lang]))
    return ("" if lang else " ").join(words)


def write_labelled(path: Path, n: int, topics: list[str], seed: int = 0, as_ints: bool = False) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            topic = topics[i % len(topics)]
            label = topics.index(topic) if as_ints else topic
            f.write(json.dumps({"text": topic_text(rng, topic), "label": label}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    rng = random.Random(1)
    texts = [topic_text(rng, t) for t in TOPICS for _ in range(200)]
    train_tokenizer(texts, TokenizerConfig(vocab_size=VOCAB), path, progress=False)
    return path.parent


def make_run(root: Path, tokenizer_dir: Path, family: str) -> Path:
    """A run as `lmforge train` leaves it (config in the checkpoint, tokenizer beside it), with the
    model at its initialisation: training it first would only slow the test down."""
    cfg = load_config(None, [f"out_dir={root}", f"model.vocab_size={VOCAB}", *SHAPE, *FAMILIES[family]])
    torch.manual_seed(0)
    save_checkpoint(RunPaths(root).checkpoints, 1, build_model(cfg.model), None, {"config": to_dict(cfg)})
    shutil.copytree(tokenizer_dir, RunPaths(root).tokenizer.parent)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    return {f: make_run(tmp_path_factory.mktemp(f), tokenizer_dir, f) for f in FAMILIES}


@pytest.fixture(scope="module")
def topics_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_labelled(tmp_path_factory.mktemp("data") / "topics.jsonl", 160, ["sport", "food"])


@pytest.fixture(scope="module")
def decoder_result(runs: dict[str, Path], topics_jsonl: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return finetune(runs["decoder"], topics_jsonl, tmp_path_factory.mktemp("ft") / "decoder", **FT)


# ---------------------------------------------------------------------------- pooling


def test_pool_reads_the_right_positions() -> None:
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    real = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(pool(hidden, real, "last"), torch.stack([hidden[0, 2], hidden[1, 4]]))  # not the pad at 4
    assert torch.equal(pool(hidden, real, "cls"), hidden[:, 0])
    assert torch.allclose(pool(hidden, real, "mean"), torch.stack([hidden[0, :3].mean(0), hidden[1].mean(0)]))
    with pytest.raises(ValueError, match="pooling"):
        pool(hidden, real, "max")


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_changes_no_pooled_state(runs: dict[str, Path], tokenizer_dir: Path, family: str) -> None:
    """A text's pooled state is the same alone and in a batch padded to a longer one: padding is
    neither attended to nor pooled (a decoder reads its last real token, never a pad)."""
    body, trained, _ = load_trained(load_config(None, [f"out_dir={runs[family]}"]))
    clf = Classifier(body, 2).eval()
    tok = load_special_tokens(tokenizer_dir / "tokenizer.json")
    from lmforge.tokenizer.train import load_tokenizer

    rows = frame_rows(load_tokenizer(tokenizer_dir / "tokenizer.json"), ["a short one", "a much longer text " * 4],
                      trained.model.family, tok, 48)
    ids, real = pad_rows(rows, pad=tok.pad)
    assert not real[0].all()  # the short row is padded
    with torch.no_grad():
        batched = clf.features(ids, real)
        alone = clf.features(*pad_rows(rows[:1], pad=tok.pad))
    assert torch.allclose(batched[0], alone[0], atol=1e-5)


# ---------------------------------------------------------------------------- fine-tuning


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_learns_the_topics(runs: dict[str, Path], topics_jsonl: Path, tmp_path: Path,
                                        family: str) -> None:
    out = tmp_path / "ft"
    m = finetune(runs[family], topics_jsonl, out, **FT)
    assert m["accuracy"] >= 0.9, m
    assert m["labels"] == ["food", "sport"]  # sorted, whatever the file's order
    assert m["n_train"] + m["n_heldout"] == 160 and m["n_heldout"] == 32
    assert sum(map(sum, m["confusion"]["matrix"])) == m["n_heldout"]
    assert m["train_loss"][-1] < m["train_loss"][0] and len(m["train_loss"]) == FT["epochs"]
    saved = json.loads((out / "finetune.json").read_text(encoding="utf-8"))
    assert saved["metrics"]["accuracy"] == m["accuracy"] and saved["labels"] == m["labels"]
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left nothing behind


def test_predict_round_trip_reproduces_the_heldout_score(decoder_result: dict, topics_jsonl: Path) -> None:
    """What predict() loads from disk scores the held-out rows exactly as the model in memory did."""
    rows = [json.loads(line) for line in topics_jsonl.read_text(encoding="utf-8").splitlines()]
    names = decoder_result["labels"]
    _, held = stratified_split([names.index(r["label"]) for r in rows], 0.2, seed=0)
    got = predict(Path(decoder_result["out_dir"]), [rows[i]["text"] for i in held])
    accuracy = sum(g == rows[i]["label"] for g, i in zip(got, held, strict=True)) / len(held)
    assert accuracy == decoder_result["accuracy"]


def test_integer_labels_stay_integers(runs: dict[str, Path], tmp_path: Path) -> None:
    data = write_labelled(tmp_path / "three.jsonl", 150, ["rain", "sport", "food"], seed=3, as_ints=True)
    m = finetune(runs["encoder"], data, tmp_path / "ft", **{**FT, "epochs": 12})
    assert m["labels"] == [0, 1, 2] and len(m["confusion"]["matrix"]) == 3
    assert sum(map(sum, m["confusion"]["matrix"])) == m["n_heldout"] == 30
    assert m["accuracy"] >= 0.9, m
    rng, topics = random.Random(99), ["rain", "sport", "food"]  # texts the model has not seen
    truth = [i % 3 for i in range(30)]
    got = predict(tmp_path / "ft", [topic_text(rng, topics[t]) for t in truth])
    assert all(type(g) is int for g in got)
    assert sum(g == t for g, t in zip(got, truth, strict=True)) >= 27


def test_frozen_body_trains_the_head_only(runs: dict[str, Path], topics_jsonl: Path, tmp_path: Path) -> None:
    before, _, _ = load_trained(load_config(None, [f"out_dir={runs['t5']}"]))
    finetune(runs["t5"], topics_jsonl, tmp_path / "ft", **{**FT, "epochs": 1}, freeze_body=True)
    after = load_file(str(tmp_path / "ft" / "model.safetensors"))
    for name, value in before.state_dict().items():
        if f"body.{name}" in after:  # tied weights are saved once
            assert torch.equal(after[f"body.{name}"], value), name
    clf, _, _, _ = load_classifier(tmp_path / "ft")
    assert clf.head.weight.abs().max() > 0.05  # moved away from its N(0, 0.02) start


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("line, match", [
    ('{"text": "no label here"}', r"bad\.jsonl:2: missing 'label'"),
    ('{"label": "x"}', r"bad\.jsonl:2: missing 'text'"),
    ("not json", r"bad\.jsonl:2: not valid JSON"),
    ('["text", "label"]', r"bad\.jsonl:2: expected a JSON object"),
    ('{"text": "t", "label": 1.5}', r"bad\.jsonl:2: 'label' must be a string or an integer"),
])
def test_bad_lines_name_file_and_line(runs: dict[str, Path], tmp_path: Path, line: str, match: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine", "label": "a"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(LabelledDataError, match=match):
        finetune(runs["decoder"], path, tmp_path / "ft")


def test_a_single_label_or_no_file_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    path = write_labelled(tmp_path / "one.jsonl", 10, ["food"])
    with pytest.raises(LabelledDataError, match="at least 2 distinct labels"):
        finetune(runs["decoder"], path, tmp_path / "ft")
    with pytest.raises(FileNotFoundError, match="nothing.jsonl: labelled JSONL file not found"):
        finetune(runs["decoder"], tmp_path / "nothing.jsonl", tmp_path / "ft")
    assert not (tmp_path / "ft").exists()


def test_out_dir_that_is_not_a_finetune_output_is_kept(runs: dict[str, Path], topics_jsonl: Path) -> None:
    with pytest.raises(ConfigError, match="not a finetune output"):
        finetune(runs["decoder"], topics_jsonl, runs["decoder"] / "checkpoints")
    assert (runs["decoder"] / "checkpoints" / "latest").is_file()


# ---------------------------------------------------------------------------- CLI


def test_cli_prints_accuracy_and_confusion_table(runs: dict[str, Path], topics_jsonl: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="lmforge")
    add_cli_parser(parser.add_subparsers(dest="stage"))
    args = parser.parse_args(["finetune", "--train", str(topics_jsonl), "--out", str(tmp_path / "ft"),
                              "--epochs", "2", "--lr", "3e-3", "--batch-size", "32", "--freeze-body", "-q",
                              f"out_dir={runs['decoder']}"])
    assert cli_main(args, load_config(None, args.overrides), progress=False) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("true \\ predicted"))
    assert header.split()[-2:] == ["food", "sport"]
    assert "held-out texts" in out and (tmp_path / "ft" / "finetune.json").is_file()
    assert json.loads((tmp_path / "ft" / "finetune.json").read_text())["freeze_body"] is True
