"""Export to Hugging Face Llama: transformers loads it with the same logits and tokenization, and
import_hf_llama brings it back unchanged."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.config import GenerateConfig
from lmforge.eval.generate import generate
from lmforge.export.hf import export_hf_llama, import_hf_llama, verify_hf_export
from lmforge.models import build_model
from lmforge.models.decoder import DecoderConfig as ModelConfig

WORDS = ["the", "model", "reads", "tokens", "and", "writes", "logits", "def", "return", "class", "import",
         "café", "naïve", "日本"]


def train_bpe(path: Path) -> Tokenizer:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) + rng.choice([".", ":\n    x = 1", "!"])
             for _ in range(400)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer=trainer)
    tokenizer.save(str(path))
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(path)
    return path


def tiny_cfg(tokenizer_path: Path, tie: bool) -> ModelConfig:
    vocab = Tokenizer.from_file(str(tokenizer_path)).get_vocab_size()
    return ModelConfig(
        vocab_size=vocab, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
        rope_theta=5000.0, norm_eps=1e-6, tie_embeddings=tie,
    )


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def exported(request: pytest.FixtureRequest, tokenizer_path: Path, tmp_path_factory: pytest.TempPathFactory):
    cfg = tiny_cfg(tokenizer_path, tie=request.param)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    out = export_hf_llama(model, cfg, tokenizer_path, tmp_path_factory.mktemp("export") / "hf", GenerateConfig())
    return model, cfg, out


def test_transformers_logits_and_tokenizer_match(exported, tokenizer_path: Path) -> None:
    model, cfg, out = exported
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    report = verify_hf_export(model, out, ids, tokenizer=Tokenizer.from_file(str(tokenizer_path)))
    assert report["max_abs_diff"] < 1e-4
    assert report["tokenizer_match"]


def test_files_config_and_weight_names(exported) -> None:
    _, cfg, out = exported
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens.json", "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert not list(out.parent.glob(".hf.*")), "temporary directory left behind"
    config = transformers.AutoConfig.from_pretrained(out, local_files_only=True)
    assert (config.num_key_value_heads, config.intermediate_size) == (2, cfg.resolved_d_ff())
    assert (config.eos_token_id, config.pad_token_id, config.tie_word_embeddings) == (0, 1, cfg.tie_embeddings)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    hf_names = set(transformers.LlamaForCausalLM(config).state_dict())
    if cfg.tie_embeddings:
        assert "lm_head.weight" not in names
        hf_names.discard("lm_head.weight")
    assert names == hf_names
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 0 and generation["do_sample"] is True


def test_hf_tokenizer_specials_and_round_trip(exported) -> None:
    _, _, out = exported
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert (hf_tokenizer.eos_token, hf_tokenizer.eos_token_id) == ("<|endoftext|>", 0)
    assert (hf_tokenizer.pad_token, hf_tokenizer.pad_token_id) == ("<|pad|>", 1)
    text = "def  naïve(x):\n\treturn 日本 ✓"
    assert hf_tokenizer.decode(hf_tokenizer(text)["input_ids"]) == text


def test_hf_greedy_generation_matches_ours(exported, tokenizer_path: Path) -> None:
    model, _, out = exported
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    hf_model = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True)
    lengths = []
    for prompt in ("the model reads", "a token", "def f(x):"):
        ids = torch.tensor([[0, *tokenizer.encode(prompt).ids]])  # ours starts from EOS too
        hf_new = hf_model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
        hf_new = hf_new[: hf_new.index(0)] if 0 in hf_new else hf_new
        ours = generate(model, tokenizer, prompt, max_new_tokens=12, temperature=0.0, top_k=0, top_p=1.0, seed=0)
        assert ours == tokenizer.decode(hf_new), prompt
        lengths.append(len(hf_new))
    assert max(lengths) > 3  # a random model may stop early on one prompt, not on all


def test_import_round_trips_to_identical_logits(exported) -> None:
    model, cfg, out = exported
    imported, imported_cfg = import_hf_llama(out)
    assert imported_cfg == dataclasses.replace(cfg, d_ff=cfg.resolved_d_ff())
    assert (imported.lm_head.weight is imported.embed_tokens.weight) == cfg.tie_embeddings
    ids = torch.randint(0, cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(imported(ids), model(ids))


def test_export_overwrites_atomically(exported, tokenizer_path: Path) -> None:
    model, cfg, out = exported
    target = out.parent / "again"
    for _ in range(2):
        export_hf_llama(model, cfg, tokenizer_path, target)
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []
    assert (target / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    # No GenerateConfig given: only the token ids, no sampling defaults.
    assert "do_sample" not in json.loads((target / "generation_config.json").read_text())


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("attention_bias", True, "attention_bias"),
        ("mlp_bias", True, "mlp_bias"),
        ("hidden_act", "gelu", "hidden_act"),
        ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}, "rope_type"),
        ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}, "rope_type"),
        ("head_dim", 32, "head_dim"),
        ("model_type", "mistral", "model_type"),
    ],
)
def test_import_refuses_what_the_decoder_cannot_represent(
    exported, tmp_path: Path, key: str, value: object, message: str
) -> None:
    _, _, out = exported
    copy = tmp_path / "hf"
    shutil.copytree(out, copy)
    config = json.loads((copy / "config.json").read_text())
    config[key] = value
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        import_hf_llama(copy)
