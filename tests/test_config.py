from pathlib import Path

import pytest

from lmforge.config import ConfigError, InputConfig, RunConfig
from lmforge.recipe import load_config


def test_defaults_are_valid():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.train.schedule.name == "cosine" and cfg.train.optimizer.name == "adamw" and cfg.data.inputs == []


def test_yaml_then_overrides_take_precedence(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  optimizer: {lr: 0.01}\n  max_steps: 50\nmodel:\n  d_model: 128\n")
    cfg = load_config(recipe, ["train.optimizer.lr=3e-4", "model.n_layers=2", "out_dir=elsewhere"])
    assert cfg.train.optimizer.lr == pytest.approx(3e-4)  # YAML 1.1 reads 3e-4 as a string; still a float
    assert cfg.train.max_steps == 50 and cfg.model.d_model == 128 and cfg.model.n_layers == 2
    assert cfg.out_dir == "elsewhere"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.lrr=1", "train.lrr"),
        ("train.max_steps=abc", "train.max_steps"),
        ("train.max_steps=1.5", "train.max_steps"),
        ("train.precision=fp8", "train.precision"),
        ("train.resume=maybe", "train.resume"),
        ("model.n_heads=3", "model.n_heads"),
        ("data.val_fraction=0.9", "data.val_fraction"),
        ("train.seq_len=4096", "train.seq_len"),
        ("nosuchsection.x=1", "nosuchsection"),
        ("train.optimizer.lr=inf", "train.optimizer.lr"),
        ("train.optimizer.lr=0", "train.optimizer.lr"),
        ("train.optimizer.beta2=1", "train.optimizer.beta2"),
        ("train.optimizer.momentum=0.9", "train.optimizer.momentum"),  # adamw has no momentum key
        ("train.schedule.warmup_steps=-1", "train.schedule.warmup_steps"),
        ("train.schedule.warmup_steps=100000", "train.schedule.warmup_steps"),
        ("train.schedule={name: wsd, decay_fraction: 0}", "train.schedule.decay_fraction"),
        ("train.log_every=0", "train.log_every"),
        ("eval.batch_size=0", "eval.batch_size"),
        ("eval.generate.top_k=-1", "eval.generate.top_k"),
        ("objective.name=fimm", "objective.name"),
        ("objective.foo=1", "objective.foo"),
        ("objective.document_mask=maybe", "objective.document_mask"),
        ("model.arch=encoder_decoder", "objective.name"),  # lm cannot train an encoder-decoder
        ("model.d_ff=-1", "model.d_ff"),
        ("model.n_kv_heads=3", "model.n_kv_heads"),
        ("model.rope_factor=0.5", "model.rope_factor"),
        ("train.optimizer=adafactorr", "train.optimizer.name"),
        ("train.schedule=wsdd", "train.schedule.name"),
        ("model.arch=t55", "model.arch"),
        ("data.filters=[{name: min_wordz}]", "data.filters[0].name"),
        ("data.filters=[{name: min_words, min_wrds: 3}]", "data.filters[0].min_wrds"),
        # stage budgets past what the run draws (1000 steps x 8 rows x 256 tokens = 2,048,000)
        ("tokens.curriculum=[{tokens: 2000000, seq_len: 256}, {tokens: 100000}]", "tokens.curriculum"),
        ("tokens.curriculum=[{tokens: 0}, {tokens: 100}]", "tokens.curriculum[0].tokens"),  # 0 only last
        ("tokens.curriculum=[{tokens: 100, seq_len: 100000}]", "tokens.curriculum[0].seq_len"),
    ],
)
def test_bad_override_names_the_key(override: str, key: str):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(key)


def test_unknown_key_in_yaml_names_dotted_path(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("eval:\n  generate:\n    temprature: 0.5\n")
    with pytest.raises(ConfigError, match=r"^eval\.generate\.temprature: unknown key"):
        load_config(recipe)


def test_scalar_input_becomes_one_input_spec():
    cfg = load_config(None, ["data.inputs=my_corpus/"])
    assert cfg.data.inputs == [InputConfig(path="my_corpus/")]


def test_list_of_inputs_from_yaml(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  inputs:\n    - {path: a.jsonl, source: web}\n    - {path: b.parquet, formt: x}\n")
    with pytest.raises(ConfigError, match=r"^data\.inputs\[1\]\.formt"):
        load_config(recipe)


def test_missing_and_malformed_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="must look like"):
        load_config(None, ["train.lr"])


def test_filter_spec_needs_a_name():
    with pytest.raises(ConfigError, match=r"^data\.filters\[0\]\.name"):
        load_config(None, ["data.filters=[{min_words: 3}]"])


def test_optimizer_and_schedule_are_chosen_by_name_with_their_own_keys():
    cfg = load_config(None, ["train.optimizer=muon", "train.schedule={name: wsd, decay_fraction: 0.1}"])
    assert cfg.train.optimizer.name == "muon" and cfg.train.optimizer.momentum == 0.95
    assert cfg.train.schedule.name == "wsd" and cfg.train.schedule.decay_fraction == 0.1
    cfg = load_config(None, ["train.optimizer.name=adafactor", "train.optimizer.beta2_decay=-0.5"])
    assert cfg.train.optimizer.beta2_decay == -0.5 and cfg.train.optimizer.lr == 1e-2  # Adafactor's own default
