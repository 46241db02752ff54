"""E4: continual pretraining through the CLI: `train.init_from` starts from an exported Hugging Face
Llama with its tokenizer (`tokenizer.from`), and the run's own export is checked like any export; with
an extended tokenizer (`lmforge extend-vocab`) the model's vocabulary grows to match."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from lmforge.cli import main
from lmforge.config import ConfigError, TokenizerConfig
from lmforge.models import build_model
from lmforge.models.decoder import DecoderConfig
from lmforge.recipe import load_config
from lmforge.tokenizer.extend import extend_vocabulary
from lmforge.tokenizer.train import train_tokenizer
from lmforge.train.model_setup import grow_vocabulary

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

    # Vocabulary extension: the exported model continues with its tokenizer grown by new text's tokens.
    new_words = ["tokenizerextension", "vocabularygrowth", "embeddingrows"]
    (tmp_path / "new.jsonl").write_text("".join(
        json.dumps({"id": str(i), "text": " ".join(rng.choice(words + new_words, 60, p=[0.08] * 11 + [0.04] * 3))})
        + "\n" for i in range(150)))
    ext = tmp_path / "ext"
    grown = extend_vocabulary(hf, [" ".join(new_words)] * 200, 12, ext)
    new_size = grown["vocab_size_after"]
    assert grown["added"] > 0 and new_size == Tokenizer.from_file(str(ext / "tokenizer.json")).get_vocab_size()
    run = tmp_path / "grown"
    assert main(["run", "--quiet", f"out_dir={run}", f"data.inputs={tmp_path / 'new.jsonl'}", f"train.init_from={hf}",
                 f"tokenizer.from={ext}", "train.max_steps=3", *TINY]) == 0
    assert f"vocab_size: {new_size}" in (run / "config.yaml").read_text()
    assert losses(run)[1] < 0.8 * trained[1], "the old rows keep what the model learned"
    assert json.loads((run / "export" / "hf" / "config.json").read_text())["vocab_size"] >= new_size


def test_init_from_refuses_a_tokenizer_that_is_not_an_extension(tmp_path):
    words = ["alpha beta gamma delta", "one two three four five", "数据 模型 学习"]
    own, other = tmp_path / "model", tmp_path / "other"
    train_tokenizer(words * 50, TokenizerConfig(vocab_size=400), own / "tokenizer.json", progress=False)
    train_tokenizer([w[::-1] for w in words] * 50, TokenizerConfig(vocab_size=520), other / "tokenizer.json",
                    progress=False)
    sizes = [Tokenizer.from_file(str(d / "tokenizer.json")).get_vocab_size() for d in (own, other)]
    assert sizes == [400, 419]  # the other is larger: it would grow the model, were it an extension
    cfg = load_config(overrides=[f"train.init_from={own}", "model.vocab_size=400"])
    model = build_model(DecoderConfig(vocab_size=400, d_model=16, n_layers=1, n_heads=2, max_seq_len=16))
    with pytest.raises(ConfigError, match="not an extension"):
        grow_vocabulary(model, cfg, Tokenizer.from_file(str(other / "tokenizer.json")), other / "tokenizer.json")
    (own / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        grow_vocabulary(model, cfg, Tokenizer.from_file(str(other / "tokenizer.json")), other / "tokenizer.json")
    assert model.cfg.vocab_size == 400  # refused before any change


def test_new_tokens_on_padding_rows_start_at_the_mean_of_the_model_s_own_tokens(tmp_path):
    """A model with more rows than tokens (padded, as Pythia): the extension's first ids land on rows
    that were never trained; they are reset to the mean of the real tokens' rows, then the rest grow."""
    own = tmp_path / "model"
    train_tokenizer(["alpha beta gamma delta epsilon", "one two three four"] * 50, TokenizerConfig(vocab_size=400),
                    own / "tokenizer.json", progress=False)
    old = Tokenizer.from_file(str(own / "tokenizer.json")).get_vocab_size()
    grown = extend_vocabulary(own, ["zetaword thetaword iotaword kappaword lambdaword"] * 100, 12, tmp_path / "ext")
    new = grown["vocab_size_after"]
    rows = old + 4  # 4 padding rows: fewer than the new tokens
    assert new > rows
    cfg = load_config(overrides=[f"train.init_from={own}", f"model.vocab_size={rows}"])
    torch.manual_seed(0)
    model = build_model(DecoderConfig(vocab_size=rows, d_model=16, n_layers=1, n_heads=2, max_seq_len=16))
    before = model.embed_tokens.weight.detach().clone()
    line = grow_vocabulary(model, cfg, Tokenizer.from_file(str(tmp_path / "ext" / "tokenizer.json")),
                           tmp_path / "ext" / "tokenizer.json")
    weight = model.embed_tokens.weight.detach()
    assert line and weight.shape[0] == new == cfg.model.vocab_size == model.cfg.vocab_size
    assert torch.equal(weight[:old], before[:old])
    mean = before[:old].mean(0)
    assert torch.allclose(weight[old:], mean.expand(new - old, -1))  # the padding rows too, not their old values
    assert not torch.allclose(before[old:rows], mean.expand(rows - old, -1))
    own_json = own / "tokenizer.json"
    assert grow_vocabulary(model, cfg, Tokenizer.from_file(str(own_json)), own_json) is None  # its own: nothing
