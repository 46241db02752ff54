"""The encoder (BERT): masks hide padding and other segments, init matches transformers, export and
import reproduce transformers' logits, unsupported checkpoints are refused, fill-mask."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from lmforge.config import ConfigError, TokenizerConfig
from lmforge.eval.fill_mask import fill_mask
from lmforge.export import exporter_for
from lmforge.export.bert import export_hf_bert, hf_name, import_hf_bert, verify_bert
from lmforge.models import build_model
from lmforge.models.encoder import EncoderConfig
from lmforge.objectives.base import AttentionLayout, ObjectiveContext, loss_sums
from lmforge.objectives.mlm import MaskedLM, MLMConfig
from lmforge.tokenizer.special_tokens import MASK, load_special_tokens
from lmforge.tokenizer.train import train_tokenizer
from lmforge.tokens.loader import Batch

VOCAB = 97
# A larger init than training's 0.02 makes one token's influence on other positions plainly visible.
TINY = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, init_std=0.1)
SENTENCES = ["The cat sat on the mat.", "Dogs bark at night!", "Is this real?", "Models read tokens.",
             "我们今天去公园散步。", "天气很好！", "你吃饭了吗？", "北京是中国的首都。"]


def tiny(**overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(EncoderConfig(**{**TINY, **overrides})).eval()


def perturb_(model: torch.nn.Module, scale: float = 0.2) -> None:
    """Noise on every parameter, so zero-initialised biases and unit norms are exercised too."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(SENTENCES) for _ in range(6)) for _ in range(200)]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(texts, TokenizerConfig(vocab_size=600), path, progress=False)
    return path


def test_forward_shapes_with_and_without_nsp_head() -> None:
    ids = torch.randint(0, VOCAB, (3, 10))
    out = tiny()(ids)
    assert out["logits"].shape == (3, 10, VOCAB) and out["nsp_logits"].shape == (3, 2)
    plain = tiny(nsp_head=False)
    assert plain(ids).shape == (3, 10, VOCAB)
    assert plain.pooler is None and plain.nsp is None


def test_config_validation_names_the_key() -> None:
    with pytest.raises(ConfigError, match="model.n_heads"):
        EncoderConfig(d_model=30, n_heads=4).validate("model")
    with pytest.raises(ConfigError, match="model.type_vocab_size"):
        EncoderConfig(type_vocab_size=1).validate("model")
    EncoderConfig(type_vocab_size=1, nsp_head=False).validate("model")
    assert EncoderConfig(d_model=64).resolved_d_ff() == 256


def test_causal_layout_is_refused() -> None:
    with pytest.raises(ValueError, match="both ways"):
        tiny()(torch.zeros(1, 4, dtype=torch.long), AttentionLayout(causal=True))


MODEL = tiny()


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    pad=st.integers(0, 4),
    data=st.data(),
)
def test_padding_and_other_segments_are_invisible(lengths: list[int], pad: int, data: st.DataObject) -> None:
    """Changing a pad token, or any token of another segment, leaves a segment's outputs unchanged."""
    segments = torch.tensor([s + 1 for s, n in enumerate(lengths) for _ in range(n)] + [0] * pad)[None]
    T = segments.shape[1]
    ids = torch.tensor(data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=T, max_size=T)))[None]
    at = data.draw(st.integers(0, T - 1))
    changed_ids = ids.clone()
    changed_ids[0, at] = (ids[0, at] + 1) % VOCAB
    layout = AttentionLayout(causal=False, segment_ids=segments)
    with torch.no_grad():
        a, b = MODEL(ids, layout)["logits"], MODEL(changed_ids, layout)["logits"]
    others = (segments[0] != segments[0, at]) & (segments[0] != 0)
    torch.testing.assert_close(a[0, others], b[0, others], rtol=0, atol=1e-6)
    if segments[0, at] != 0:  # the changed token's own segment does see it
        same = segments[0] == segments[0, at]
        assert (a[0, same] - b[0, same]).abs().max() > 1e-5


def test_layout_without_segments_sees_everything() -> None:
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        full = MODEL(ids)["logits"]
        one_segment = MODEL(ids, AttentionLayout(causal=False, segment_ids=torch.ones(2, 9, dtype=torch.long)))
    torch.testing.assert_close(full, one_segment["logits"], rtol=0, atol=1e-6)


def hf_bert_config(nsp: bool, **overrides: object) -> transformers.BertConfig:
    kwargs = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                  max_position_embeddings=48, type_vocab_size=3, layer_norm_eps=1e-7, initializer_range=0.05,
                  architectures=["BertForPreTraining" if nsp else "BertForMaskedLM"])
    return transformers.BertConfig(**{**kwargs, **overrides})


def test_fresh_init_statistics_match_transformers() -> None:
    """Every parameter of a fresh model has the std (within 10%) and mean of transformers' init."""
    torch.manual_seed(0)
    hf_cfg = hf_bert_config(True, vocab_size=500, hidden_size=128, intermediate_size=512)
    theirs = dict(transformers.BertForPreTraining(hf_cfg).named_parameters())
    cfg = EncoderConfig(vocab_size=500, d_model=128, n_layers=2, n_heads=4, d_ff=512, max_seq_len=48,
                        type_vocab_size=3, init_std=0.05)
    ours = dict(build_model(cfg).named_parameters())
    assert {hf_name(n) for n in ours} == set(theirs)
    for name, p in ours.items():
        q = theirs[hf_name(name)].detach()
        if q.std() == 0:  # biases and norms: exact constants
            assert torch.equal(p.detach(), q), name
        else:
            assert abs(p.std().item() / q.std().item() - 1) < 0.1, name
            assert abs(p.mean().item()) < 0.01, name


@pytest.fixture(scope="module", params=[True, False], ids=["pretraining", "masked_lm"])
def exported(request: pytest.FixtureRequest, tokenizer_path: Path, tmp_path_factory: pytest.TempPathFactory):
    vocab = Tokenizer.from_file(str(tokenizer_path)).get_vocab_size()
    cfg = EncoderConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, nsp_head=request.param)
    model = tiny(**{**TINY, "vocab_size": vocab, "nsp_head": request.param})
    perturb_(model)
    out = export_hf_bert(model, cfg, tokenizer_path, tmp_path_factory.mktemp("export") / "hf")
    return model, cfg, out


def test_export_reloads_with_same_logits_and_tokenizer(exported, tokenizer_path: Path) -> None:
    model, cfg, out = exported
    report = verify_bert(model, out, seed=3, tokenizer=Tokenizer.from_file(str(tokenizer_path)))
    assert report["max_abs_diff"] < 1e-4 and report["mlm_max_abs_diff"] < 1e-4
    assert ("nsp_max_abs_diff" in report) == cfg.nsp_head
    assert report["tokenizer_match"]
    hf = json.loads((out / "config.json").read_text())
    assert hf["architectures"] == ["BertForPreTraining" if cfg.nsp_head else "BertForMaskedLM"]
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["mask_token"] == MASK and tok_cfg["cls_token"] == "<|cls|>"


def test_export_then_import_round_trips(exported) -> None:
    model, cfg, out = exported
    back, back_cfg = import_hf_bert(out)
    assert back_cfg.nsp_head == cfg.nsp_head and back_cfg.resolved_d_ff() == cfg.resolved_d_ff()
    for (n, p), (m, q) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert n == m and torch.equal(p, q), n


def test_exporter_is_registered_by_nsp_head() -> None:
    assert exporter_for(EncoderConfig(), MLMConfig()).name == "BertForPreTraining"
    assert exporter_for(EncoderConfig(nsp_head=False), MLMConfig(nsp=False)).name == "BertForMaskedLM"


@pytest.mark.parametrize("nsp", [True, False], ids=["pretraining", "masked_lm"])
def test_import_matches_transformers(nsp: bool, tmp_path: Path) -> None:
    """A random transformers BERT saved with save_pretrained imports with the same logits (padding
    and token types included)."""
    torch.manual_seed(1)
    hf_cls = transformers.BertForPreTraining if nsp else transformers.BertForMaskedLM
    hf_model = hf_cls(hf_bert_config(nsp)).eval()
    perturb_(hf_model, 0.05)
    hf_model.save_pretrained(tmp_path)
    model, cfg = import_hf_bert(tmp_path)
    assert cfg.nsp_head == nsp and cfg.type_vocab_size == 3 and cfg.norm_eps == 1e-7
    ids = torch.randint(0, 300, (2, 40))
    types = torch.randint(0, 3, (2, 40))
    real = torch.ones(2, 40, dtype=torch.long)
    real[1, 30:] = 0
    with torch.no_grad():
        theirs = hf_model(input_ids=ids, attention_mask=real, token_type_ids=types)
        ours = model(ids, AttentionLayout(causal=False, segment_ids=real), token_type_ids=types)
    keep = real.bool()
    ours_mlm = ours["logits"] if nsp else ours
    theirs_mlm = theirs.prediction_logits if nsp else theirs.logits
    assert (ours_mlm - theirs_mlm).abs()[keep].max() < 1e-4
    if nsp:
        assert (ours["nsp_logits"] - theirs.seq_relationship_logits).abs().max() < 1e-4


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("hidden_act", "relu", "hidden_act='relu'"),
        ("position_embedding_type", "relative_key", "position_embedding_type='relative_key'"),
        ("is_decoder", True, "is_decoder=True"),
        ("architectures", ["BertForSequenceClassification"], "architectures="),
        ("tie_word_embeddings", False, "tie_word_embeddings=False"),
    ],
)
def test_import_refuses_what_it_cannot_represent(key: str, value: object, named: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    transformers.BertForMaskedLM(hf_bert_config(False)).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    hf = json.loads(path.read_text())
    hf[key] = value
    path.write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="not supported by lmforge's encoder") as e:
        import_hf_bert(tmp_path)
    assert named in str(e.value)


def test_import_names_missing_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    transformers.BertForMaskedLM(hf_bert_config(False)).save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"missing \['bert.encoder.layer.2"):
        import_hf_bert(tmp_path)


def mlm_batch(tokenizer: Tokenizer, special, rows: int, T: int) -> Batch:
    rng = random.Random(1)
    ids, docs = [], []
    for d in range(rows * 4):
        enc = tokenizer.encode(" ".join(rng.choice(SENTENCES) for _ in range(5))).ids + [special.eos]
        ids += enc
        docs += [d] * len(enc)
    tokens = torch.tensor(ids[: rows * T]).view(rows, T).numpy()
    return Batch(tokens, torch.tensor(docs[: rows * T]).view(rows, T).numpy(), torch.arange(rows).numpy())


def test_mlm_nsp_examples_train_the_encoder(tokenizer_path: Path) -> None:
    """Examples from the objective feed the model as they are (model_inputs), and the summed
    MLM + NSP loss falls on a fixed batch."""
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    special = load_special_tokens(tokenizer_path, tokenizer)
    vocab = tokenizer.get_vocab_size()
    objective = MaskedLM(MLMConfig(), ObjectiveContext(special, vocab, seed=0, tokenizer=tokenizer))
    ex = objective(mlm_batch(tokenizer, special, rows=8, T=48))
    model = tiny(vocab_size=vocab, init_std=0.02).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        sums = loss_sums(model(**ex.model_inputs()), ex)
        counts = ex.target_counts()
        loss = sums["lm"] / counts["lm"] + sums["nsp"] / counts["nsp"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_sparse_prediction_equals_the_full_head(tokenizer_path: Path) -> None:
    """Logits only at the MLM targets (predict_positions) give the same loss, accuracy inputs and
    gradients as the full head read at those positions."""
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    special = load_special_tokens(tokenizer_path, tokenizer)
    vocab = tokenizer.get_vocab_size()
    ex = MaskedLM(MLMConfig(), ObjectiveContext(special, vocab, seed=0, tokenizer=tokenizer))(
        mlm_batch(tokenizer, special, rows=6, T=48))
    assert ex.predict_positions is not None and torch.equal(ex.predict_positions, ex.loss_mask.bool())
    model = tiny(vocab_size=vocab)
    sparse = model(**ex.model_inputs())
    full = model(**{k: v for k, v in ex.model_inputs().items() if k != "predict_positions"})
    assert sparse["logits"].shape == (int(ex.loss_mask.sum()), vocab)
    torch.testing.assert_close(sparse["logits"], full["logits"][ex.predict_positions], rtol=0, atol=1e-5)
    full_ex = dataclasses.replace(ex, predict_positions=None)
    for a, b in zip(loss_sums(sparse, ex).values(), loss_sums(full, full_ex).values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def fill_model(tokenizer_path: Path, favourite: str) -> tuple[torch.nn.Module, Tokenizer, object, int]:
    """A tiny encoder whose MLM bias makes `favourite` the top prediction everywhere."""
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    special = load_special_tokens(tokenizer_path, tokenizer)
    model = tiny(vocab_size=tokenizer.get_vocab_size(), init_std=0.02)
    target = tokenizer.encode(favourite).ids
    assert len(target) == 1, "the favourite must be a single token"
    with torch.no_grad():
        model.mlm_bias[target[0]] = 30.0
        model.mlm_bias[special.eos] = 28.0  # a special token never shows up as a prediction
    return model, tokenizer, special, target[0]


def test_fill_mask_replaces_each_placeholder_with_its_top_prediction(tokenizer_path: Path) -> None:
    model, tokenizer, special, _ = fill_model(tokenizer_path, " cat")
    out = fill_mask(model, tokenizer, "The [MASK] sat on the [MASK].", special, top_k=3)
    filled, notes = out.split("  (", 1)
    assert filled == "The cat sat on the cat."
    # Probabilities are the model's own: the special token keeps its share (about 1 / (1 + e^2)).
    one = r"cat 0\.(8[5-9]|9[0-3])( \| \S+ 0\.00){2}"
    assert re.fullmatch(rf"\[MASK\] 1: {one}\) \(\[MASK\] 2: {one}\)", notes)
    own = fill_mask(model, tokenizer, f"Dogs{MASK} at night!", special, top_k=1)
    assert re.fullmatch(r"Dogs cat at night!  \(\[MASK\] 1: cat 0\.\d\d\)", own)


def test_fill_mask_needs_a_placeholder(tokenizer_path: Path) -> None:
    model, tokenizer, special, _ = fill_model(tokenizer_path, " cat")
    with pytest.raises(ValueError, match=r"needs at least one \[MASK\]"):
        fill_mask(model, tokenizer, "no placeholder here", special)


def test_fill_mask_on_chinese_and_too_long_text(tokenizer_path: Path) -> None:
    model, tokenizer, special, _ = fill_model(tokenizer_path, "天")
    out = fill_mask(model, tokenizer, "我们今[MASK]去公园。", special, top_k=2)
    assert out.startswith("我们今天去公园。  ([MASK] 1: 天 0.")
    with pytest.raises(ValueError, match="more than the model's 64"):
        fill_mask(model, tokenizer, "[MASK] " + "cat " * 80, special)
