"""The whole pipeline through the CLI on a small slice of the built-in corpus."""

import json
import shutil
from pathlib import Path

import pytest

from lmforge import stages
from lmforge.cli import main, run_all, summary
from lmforge.recipe import load_config

TINY = [
    "data.builtin.max_prose_bytes=150000",
    "data.builtin.max_code_bytes=150000",
    "tokenizer.vocab_size=512",
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.max_seq_len=128",
    "train.seq_len=64",
    "train.batch_size=8",
    "train.max_steps=250",
    "train.schedule.warmup_steps=5",
    "train.checkpoint_every=100",
    "eval.generate.max_new_tokens=8",
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run")
    cfg = load_config(None, [f"out_dir={out}", *TINY])
    return out, run_all(cfg, progress=False)


def test_run_produces_every_artifact(finished_run):
    out, r = finished_run
    ledger = json.loads((out / "data" / "ledger.json").read_text())
    assert r["data"]["docs_kept"] + r["data"]["docs_removed"] == r["data"]["docs_in"] > 50
    assert r["data"]["train_docs"] > 0 and r["data"]["val_docs"] > 0
    assert ledger  # per-step counters are on disk
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert r["tokenize"]["train"]["n_docs"] == r["data"]["train_docs"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000250"
    assert json.loads((out / "eval.json").read_text())["loss"] == pytest.approx(r["eval"]["loss"])
    assert (out / "export" / "hf" / "config.json").is_file()
    assert r["export"]["max_abs_diff"] < 1e-4 and r["export"]["tokenizer_match"]


def test_trained_model_beats_unigram_baseline(finished_run):
    _, r = finished_run
    ev = r["eval"]
    assert ev["loss"] < ev["unigram_loss"] - 0.3
    assert ev["bits_per_byte"] > 0 and ev["perplexity"] > 1
    text = summary(r)
    assert "below" in text and "export" in text


def test_interrupted_training_resumes_on_the_same_curve(finished_run, tmp_path: Path):
    src, _ = finished_run
    for name in ("a", "b"):
        for part in ("data", "tokenizer", "tokens"):
            shutil.copytree(src / part, tmp_path / name / part)
    cfg_a = load_config(None, [f"out_dir={tmp_path / 'a'}", *TINY, "train.max_steps=12", "train.checkpoint_every=4"])
    cfg_b = load_config(None, [f"out_dir={tmp_path / 'b'}", *TINY, "train.max_steps=12", "train.checkpoint_every=4"])
    stages.stage_train(cfg_a, progress=False)
    stages.stage_train(cfg_b, progress=False, stop_after=7)  # dies after step 7; last checkpoint is step 4
    resumed = stages.stage_train(cfg_b, progress=False)
    assert resumed["resumed_from"] == 4
    curve = lambda d: [(r["step"], r["loss"]) for r in map(json.loads, (d / "metrics.jsonl").open())]  # noqa: E731
    assert curve(tmp_path / "b") == curve(tmp_path / "a")


def test_resume_refuses_a_changed_model(finished_run, tmp_path: Path):
    src, _ = finished_run
    shutil.copytree(src, tmp_path / "r")
    cfg = load_config(None, [f"out_dir={tmp_path / 'r'}", *TINY, "model.n_layers=3"])
    with pytest.raises(ValueError, match="another model config"):
        stages.stage_train(cfg, progress=False)


def test_cli_reports_bad_keys_and_missing_inputs(tmp_path: Path, capsys):
    assert main(["train", "train.lrr=1"]) == 2
    assert "train.lrr: unknown key" in capsys.readouterr().err
    assert main(["tokenize", f"out_dir={tmp_path}"]) == 2
    assert "run `lmforge tokenizer` first" in capsys.readouterr().err


def test_cli_generate_prints_a_sample(finished_run, capsys):
    out, _ = finished_run
    assert main(["generate", "--prompt", "import ", f"out_dir={out}", *TINY]) == 0
    assert capsys.readouterr().out.strip()


def test_rerunning_a_finished_run_is_idempotent(finished_run, tmp_path: Path):
    src, first = finished_run
    shutil.copytree(src, tmp_path / "again")
    again = run_all(load_config(None, [f"out_dir={tmp_path / 'again'}", *TINY]), progress=False)
    assert again["train"]["resumed_from"] == 250 and again["train"]["steps"] == 250
    assert again["eval"]["loss"] == first["eval"]["loss"]
    assert again["data"]["docs_kept"] == first["data"]["docs_kept"]


def test_model_vocab_smaller_than_tokenizer_is_a_config_error(finished_run, tmp_path: Path, capsys):
    src, _ = finished_run
    shutil.copytree(src, tmp_path / "v")
    assert main(["train", f"out_dir={tmp_path / 'v'}", *TINY, "model.vocab_size=300", "train.resume=false"]) == 2
    assert "model.vocab_size: 300 is smaller than the tokenizer's 512" in capsys.readouterr().err


FAMILIES = {  # every family x objective pairing, tiny, through the CLI stages after the shared data stages
    "bert": ["model.arch=encoder", "objective.name=mlm"],
    "bert_wwm_no_nsp": ["model.arch=encoder", "model.nsp_head=false", "objective.name=mlm", "objective.nsp=false",
                        "objective.whole_word=true"],
    "t5": ["model.arch=encoder_decoder", "objective.name=span_corruption"],
    "bart": ["model.arch=encoder_decoder", "model.variant=bart", "objective.name=bart"],
    "ul2": ["model.arch=encoder_decoder", "objective.name=ul2"],
    "mix": ["model.arch=encoder_decoder", "objective.name=mix",
            "objective.components=[{weight: 1, objective: {name: span_corruption}},"
            " {weight: 1, objective: {name: bart}}]"],
    "prefix_lm": ["objective.name=prefix_lm", "export.format=none"],
    "fim": ["objective.name=fim"],
    "lm_alibi_window": ["model.position=alibi", "model.sliding_window=16", "export.format=none"],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_evaluates_exports_and_samples(finished_run, tmp_path: Path, family: str, capsys):
    src, _ = finished_run
    out = tmp_path / family
    for part in ("data", "tokenizer", "tokens"):
        shutil.copytree(src / part, out / part)
    args = [f"out_dir={out}", *TINY, "train.max_steps=6", "train.checkpoint_every=3", *FAMILIES[family]]
    for stage in ("train", "eval", "export"):
        assert main([stage, "--quiet", *args]) == 0, capsys.readouterr().err
    ev = json.loads((out / "eval.json").read_text())
    assert ev["loss"] < ev["loss_at_init"] and ev["tokens"] > 0 and isinstance(ev["sample"], str)
    exported = "export.format=none" not in FAMILIES[family]
    assert (out / "export" / "hf" / "config.json").is_file() == exported
    flag = ["--fill-mask", "Return the [MASK] value."] if family.startswith("bert") else ["--prompt", "Return"]
    capsys.readouterr()
    assert main(["generate", *flag, *args]) == 0
    assert capsys.readouterr().out.strip()


def test_pairing_an_objective_with_the_wrong_family_stops_at_load(capsys):
    assert main(["train", "model.arch=decoder", "objective.name=mlm"]) == 2
    assert "objective.name: objective 'mlm' cannot train model.arch 'decoder'" in capsys.readouterr().err
    assert main(["train", "model.arch=encoder", "objective.name=span_corruption"]) == 2
    assert "cannot train model.arch 'encoder'" in capsys.readouterr().err
    assert main(["train", "model.arch=encoder", "model.nsp_head=false", "objective.name=mlm"]) == 2
    assert "objective.nsp" in capsys.readouterr().err


def test_fill_mask_on_a_decoder_is_refused(finished_run, capsys):
    out, _ = finished_run
    assert main(["generate", "--fill-mask", "a [MASK]", f"out_dir={out}", *TINY]) == 2
    assert "--fill-mask needs an encoder" in capsys.readouterr().err
