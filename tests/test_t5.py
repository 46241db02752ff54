"""T5 v1.1 (encoder-decoder variant "t5"): masks never leak across packed segments, padding or the
future; one relative bias per stack; init and logits as transformers' T5ForConditionalGeneration;
export/import parity; seq2seq generation equal to transformers' greedy decoding."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import nn
from torch.testing import assert_close

from lmforge.config import GenerateConfig, ObjectiveConfig, TokenizerConfig
from lmforge.eval.seq2seq import generate_seq2seq
from lmforge.export import exporter_for
from lmforge.export.t5 import export_hf_t5, hf_t5_config, hf_t5_name, import_hf_t5, verify_t5
from lmforge.models import build_model, count_params
from lmforge.models.encoder_decoder import EncoderDecoderConfig
from lmforge.models.positions import T5RelativeBias
from lmforge.models.t5 import T5Model
from lmforge.objectives.base import AttentionLayout
from lmforge.tokenizer.special_tokens import SpecialTokens, load_special_tokens
from lmforge.tokenizer.train import train_tokenizer

VOCAB = 97
# d_kv 12 != d_model / n_heads; few buckets and a short max distance so test lengths reach the log buckets.
TINY = dict(vocab_size=VOCAB, max_seq_len=64, d_model=32, n_layers=2, n_decoder_layers=3, n_heads=4, d_kv=12,
            d_ff=48, relative_buckets=8, relative_max_distance=16)
WORDS = ["the", "model", "reads", "tokens", "and", "writes", "logits", "encoder", "decoder", "café", "日本"]


def tiny(**overrides: object) -> T5Model:
    torch.manual_seed(0)
    return build_model(EncoderDecoderConfig(**{**TINY, **overrides})).eval()


MODEL = tiny()


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(300)]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(texts, TokenizerConfig(vocab_size=600, min_frequency=1), path, progress=False)
    return path


def test_shapes_and_head_width() -> None:
    ids, dec = torch.randint(0, VOCAB, (3, 20)), torch.randint(0, VOCAB, (3, 7))
    with torch.no_grad():
        assert MODEL(ids, decoder_input_ids=dec).shape == (3, 7, VOCAB)
        assert MODEL.encode(ids).shape == (3, 20, 32)
    attn = MODEL.decoder.layers[0].cross_attn
    assert attn.q_proj.weight.shape == (4 * 12, 32) and attn.o_proj.weight.shape == (32, 4 * 12)
    assert (len(MODEL.encoder.layers), len(MODEL.decoder.layers)) == (2, 3)
    assert not any(name.endswith("bias") and "relative" not in name for name, _ in MODEL.named_parameters())


def test_relative_bias_one_per_stack_computed_once_per_forward() -> None:
    biases = {name: m for name, m in MODEL.named_modules() if isinstance(m, T5RelativeBias)}
    assert sorted(biases) == ["decoder.relative_bias", "encoder.relative_bias"]
    assert biases["encoder.relative_bias"].bidirectional and not biases["decoder.relative_bias"].bidirectional
    calls: list[str] = []
    hooks = [m.register_forward_hook(lambda *_, name=name: calls.append(name)) for name, m in biases.items()]
    try:
        with torch.no_grad():
            MODEL(torch.randint(0, VOCAB, (2, 10)), decoder_input_ids=torch.randint(0, VOCAB, (2, 5)))
    finally:
        for hook in hooks:
            hook.remove()
    assert sorted(calls) == ["decoder.relative_bias", "encoder.relative_bias"]


def packed(lengths: list[int], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment ids (1, 2, ..; 0 = pad) and positions restarting per segment, each [1, T]."""
    seg = [s + 1 for s, n in enumerate(lengths) for _ in range(n)] + [0] * pad
    pos = [i for n in lengths for i in range(n)] + [0] * pad
    return torch.tensor([seg]), torch.tensor([pos])


def run_packed(model: T5Model, enc: torch.Tensor, dec: torch.Tensor, enc_seg: torch.Tensor, enc_pos: torch.Tensor,
               dec_seg: torch.Tensor, dec_pos: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(enc, AttentionLayout(causal=False, segment_ids=enc_seg), enc_pos, decoder_input_ids=dec,
                     decoder_layout=AttentionLayout(causal=True, segment_ids=dec_seg), decoder_position_ids=dec_pos)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_decoder_position_sees_only_its_segment_and_past(data: st.DataObject) -> None:
    enc_lengths = data.draw(st.lists(st.integers(1, 8), min_size=2, max_size=3), label="enc_lengths")
    dec_lengths = data.draw(st.lists(st.integers(1, 6), min_size=len(enc_lengths), max_size=len(enc_lengths)),
                            label="dec_lengths")
    enc_seg, enc_pos = packed(enc_lengths, data.draw(st.integers(0, 3), label="enc_pad"))
    dec_seg, dec_pos = packed(dec_lengths, data.draw(st.integers(0, 3), label="dec_pad"))
    S, T = enc_seg.shape[1], dec_seg.shape[1]
    enc = torch.tensor([data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=S, max_size=S), label="enc")])
    dec = torch.tensor([data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=T, max_size=T), label="dec")])
    j = data.draw(st.sampled_from([t for t in range(T) if dec_seg[0, t] > 0]), label="j")
    own = int(dec_seg[0, j])
    hidden = [("enc", s) for s in range(S) if enc_seg[0, s] != own]  # other segments and padding
    hidden += [("dec", t) for t in range(T) if t > j or dec_seg[0, t] != own]  # the future, other segments
    visible = [("enc", s) for s in range(S) if enc_seg[0, s] == own]
    base = run_packed(MODEL, enc, dec, enc_seg, enc_pos, dec_seg, dec_pos)[0, j]

    def perturbed(side: str, i: int) -> torch.Tensor:
        e, d = enc.clone(), dec.clone()
        target = e if side == "enc" else d
        target[0, i] = (target[0, i] + data.draw(st.integers(1, VOCAB - 1), label="shift")) % VOCAB
        return run_packed(MODEL, e, d, enc_seg, enc_pos, dec_seg, dec_pos)[0, j]

    if hidden:
        assert_close(perturbed(*data.draw(st.sampled_from(hidden), label="hidden")), base, rtol=0, atol=1e-5)
    assert (perturbed(*data.draw(st.sampled_from(visible), label="visible")) - base).abs().max() > 1e-4


def test_packed_segment_equals_the_segment_alone() -> None:
    """Positions restart per segment, so the relative bias of a packed document is its own."""
    g = torch.Generator().manual_seed(0)
    enc, dec = torch.randint(0, VOCAB, (1, 15), generator=g), torch.randint(0, VOCAB, (1, 11), generator=g)
    enc_seg, enc_pos = packed([6, 9], 0)
    dec_seg, dec_pos = packed([4, 5], 2)
    together = run_packed(MODEL, enc, dec, enc_seg, enc_pos, dec_seg, dec_pos)
    with torch.no_grad():
        alone = MODEL(enc[:, 6:], decoder_input_ids=dec[:, 4:9])
    # The lone row takes SDPA's maskless kernel, the packed one the masked kernel: fp32 rounding only.
    assert_close(together[:, 4:9], alone, rtol=1e-5, atol=1e-5)


def test_init_statistics_match_a_fresh_transformers_t5() -> None:
    cfg = EncoderDecoderConfig(vocab_size=600, d_model=64, n_layers=2, n_heads=8, d_kv=16, d_ff=128,
                               relative_buckets=64)
    torch.manual_seed(0)
    ours = build_model(cfg)
    hf = transformers.T5ForConditionalGeneration(hf_t5_config(cfg, {}))
    theirs = hf.state_dict()
    expected = {"q": (64 * 16) ** -0.5, "k": 64**-0.5, "o": (8 * 16) ** -0.5, "wo": 128**-0.5, "wi_0": 64**-0.5,
                "relative_attention_bias": 64**-0.5, "shared": 1.0, "lm_head": 1.0}
    for name, p in ours.state_dict().items():
        hf_name = hf_t5_name(name)
        a, b = p.float(), theirs[hf_name].float()
        if "norm" in name:
            assert torch.equal(a, torch.ones_like(a)) and torch.equal(b, torch.ones_like(b)), name
            continue
        assert abs(a.std() - b.std()) < 0.1 * b.std() and abs(a.mean() - b.mean()) < 0.1 * b.std(), name
        key = hf_name.split(".")[-2]
        if key in expected:
            assert abs(a.std() - expected[key]) < 0.1 * expected[key], name


def test_position_ids_feed_both_relative_biases() -> None:
    g = torch.Generator().manual_seed(1)
    ids, dec = torch.randint(0, VOCAB, (1, 12), generator=g), torch.randint(0, VOCAB, (1, 8), generator=g)
    with torch.no_grad():
        default = MODEL(ids, decoder_input_ids=dec)
        explicit = MODEL(ids, None, torch.arange(12)[None], decoder_input_ids=dec,
                         decoder_position_ids=torch.arange(8)[None])
        spread_enc = MODEL(ids, None, 3 * torch.arange(12)[None], decoder_input_ids=dec)
        spread_dec = MODEL(ids, decoder_input_ids=dec, decoder_position_ids=3 * torch.arange(8)[None])
    assert torch.equal(default, explicit)
    assert (spread_enc - default).abs().max() > 1e-3 and (spread_dec - default).abs().max() > 1e-3


def test_tied_shares_the_embedding_and_rescales_the_decoder_output() -> None:
    untied, tied = tiny(), tiny(tie_embeddings=True)
    assert untied.lm_head.weight is not untied.shared.weight
    assert tied.lm_head.weight is tied.shared.weight
    assert count_params(untied) - count_params(tied) == VOCAB * 32
    outputs: list[torch.Tensor] = []
    hook = tied.decoder.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    ids, dec = torch.randint(0, VOCAB, (2, 9)), torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        logits = tied(ids, decoder_input_ids=dec)
    hook.remove()
    assert_close(logits, outputs[0] * 32**-0.5 @ tied.shared.weight.T)


def test_config_builds_t5_and_validates_d_kv() -> None:
    assert isinstance(build_model(EncoderDecoderConfig(vocab_size=50, d_model=30, n_heads=4, d_kv=8)), T5Model)
    with pytest.raises(ValueError, match="variant 't5'"):
        T5Model(EncoderDecoderConfig(vocab_size=50, variant="bart"))


# ---------------------------------------------------------------- export / import


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def exported(request: pytest.FixtureRequest, tokenizer_path: Path, tmp_path_factory: pytest.TempPathFactory):
    vocab = Tokenizer.from_file(str(tokenizer_path)).get_vocab_size()
    model = tiny(vocab_size=vocab, tie_embeddings=request.param)
    out = export_hf_t5(model, model.cfg, tokenizer_path, tmp_path_factory.mktemp("export") / "hf", GenerateConfig())
    return model, out


def test_export_reloads_with_equal_logits_and_tokenizer(exported, tokenizer_path: Path) -> None:
    model, out = exported
    report = verify_t5(model, out, tokenizer=Tokenizer.from_file(str(tokenizer_path)))
    assert report["max_abs_diff"] < 1e-4 and report["tokenizer_match"]
    exporter = exporter_for(model.cfg, ObjectiveConfig())
    assert exporter.name == "T5ForConditionalGeneration" and exporter.verify is verify_t5


def test_export_matches_transformers_with_encoder_padding(exported) -> None:
    """Right-padded encoder rows: our segment ids 0 and transformers' attention_mask hide the same keys."""
    model, out = exported
    hf = transformers.T5ForConditionalGeneration.from_pretrained(out, dtype=torch.float32, local_files_only=True,
                                                                 attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 40), generator=g)
    dec = torch.randint(0, model.cfg.vocab_size, (2, 20), generator=g)
    keep = (torch.arange(40)[None] < torch.tensor([[40], [23]])).long()
    with torch.no_grad():
        ours = model(ids, AttentionLayout(causal=False, segment_ids=keep), decoder_input_ids=dec)
        theirs = hf(input_ids=ids, attention_mask=keep, decoder_input_ids=dec).logits
    assert (ours - theirs).abs().max() < 1e-4


def test_export_files_config_and_weight_names(exported, tokenizer_path: Path) -> None:
    model, out = exported
    special = load_special_tokens(tokenizer_path)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["T5ForConditionalGeneration"]
    assert (config["feed_forward_proj"], config["d_kv"], config["d_ff"], config["num_decoder_layers"]) == (
        "gated-gelu", 12, 48, 3)
    assert (config["relative_attention_num_buckets"], config["relative_attention_max_distance"]) == (8, 16)
    assert (config["decoder_start_token_id"], config["pad_token_id"], config["eos_token_id"]) == (
        special.pad, special.pad, special.eos)
    assert config["tie_word_embeddings"] == model.cfg.tied
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["decoder_start_token_id"], generation["eos_token_id"]) == (special.pad, special.eos)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    hf_names = set(transformers.T5ForConditionalGeneration(hf_t5_config(model.cfg, {})).state_dict())
    hf_names -= {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}  # aliases of `shared`
    if model.cfg.tied:
        hf_names.discard("lm_head.weight")
    assert names == hf_names


def test_import_round_trips_the_export(exported) -> None:
    model, out = exported
    imported, cfg = import_hf_t5(out)
    assert cfg == dataclasses.replace(model.cfg, max_seq_len=512, norm_eps=1e-6, d_ff=48)
    assert (imported.lm_head.weight is imported.shared.weight) == model.cfg.tied
    ids, dec = torch.randint(0, cfg.vocab_size, (2, 30)), torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(imported(ids, decoder_input_ids=dec), model(ids, decoder_input_ids=dec))


@pytest.mark.parametrize("tie", [False, True])
def test_import_of_a_transformers_t5(tie: bool, tmp_path: Path) -> None:
    """A T5 built and saved by transformers itself (5 ties a fresh v1.1 model's output layer to `shared`
    without rescaling: that imports as untied with a copy)."""
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_decoder_layers=1,
                                   num_heads=2, feed_forward_proj="gated-gelu", tie_word_embeddings=tie,
                                   relative_attention_num_buckets=16, dropout_rate=0.0)
    hf = transformers.T5ForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path)
    model, cfg = import_hf_t5(tmp_path)
    assert (cfg.d_kv, cfg.n_layers, cfg.decoder_layers, cfg.relative_buckets, cfg.tied) == (8, 2, 1, 16, tie)
    ids, dec = torch.randint(0, VOCAB, (2, 25)), torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        diff = (model(ids, decoder_input_ids=dec) - hf(input_ids=ids, decoder_input_ids=dec).logits).abs().max()
    assert diff < 1e-4


def saved_t5(tmp_path: Path, **config: object) -> Path:
    hf_cfg = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2,
                                   **{"feed_forward_proj": "gated-gelu", **config})
    transformers.T5ForConditionalGeneration(hf_cfg).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize(("config", "message"), [
    ({"feed_forward_proj": "relu"}, r"feed_forward_proj='relu' \(is_gated_act False, T5 v1.0"),
    ({"feed_forward_proj": "gated-silu"}, r"feed_forward_proj='gated-silu' is not supported.*tanh GELU"),
])
def test_import_refuses_other_t5_mlps(config: dict[str, object], message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        import_hf_t5(saved_t5(tmp_path, **config))


def test_import_refuses_rescaled_untied_outputs_and_other_models(tmp_path: Path) -> None:
    src = saved_t5(tmp_path)
    config = json.loads((src / "config.json").read_text())
    weights = load_file(str(src / "model.safetensors"))
    save_file({**weights, "lm_head.weight": torch.randn(VOCAB, 16)}, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({**config, "scale_decoder_outputs": True}))
    with pytest.raises(ValueError, match="rescales decoder outputs only when the embeddings are tied"):
        import_hf_t5(src)
    (src / "config.json").write_text(json.dumps({**config, "model_type": "mt5"}))
    with pytest.raises(ValueError, match="model_type='mt5' is not 't5'"):
        import_hf_t5(src)


def test_exporter_refuses_bart_configs_of_t5_export() -> None:
    with pytest.raises(ValueError, match="model.variant='bart' is not T5"):
        export_hf_t5(MODEL, EncoderDecoderConfig(vocab_size=VOCAB, variant="bart"), Path("unused"), Path("unused"))


# ---------------------------------------------------------------- generation


def test_greedy_generation_matches_transformers(exported, tokenizer_path: Path) -> None:
    model, out = exported
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    special = load_special_tokens(tokenizer_path)
    text = "the encoder reads tokens and the decoder writes"
    ours = generate_seq2seq(model, tokenizer, text, special, max_new_tokens=12, temperature=0.0)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(out, dtype=torch.float32, local_files_only=True)
    ids = torch.tensor([tokenizer.encode(text).ids + [special.eos]])
    # use_cache=False: transformers 5.24 sizes the generation cache by num_layers, not num_decoder_layers.
    new = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                      use_cache=False)[0].tolist()
    assert new[0] == special.pad
    new = new[1:]
    new = new[: new.index(special.eos)] if special.eos in new else new
    assert len(new) > 3 and ours == tokenizer.decode(new)
    again = [generate_seq2seq(model, tokenizer, text, special, max_new_tokens=8, seed=5) for _ in range(2)]
    assert again[0] == again[1]  # sampling is seeded


class Scripted(nn.Module):
    """An encoder-decoder that emits `script` then EOS, recording what generation feeds it."""

    def __init__(self, script: list[int], eos: int, vocab: int):
        super().__init__()
        self.cfg = EncoderDecoderConfig(vocab_size=vocab, max_seq_len=32)
        self.script, self.eos, self.vocab = script, eos, vocab
        self.encoded: list[list[int]] = []
        self.decoded: list[list[int]] = []

    def encode(self, input_ids: torch.Tensor, layout: AttentionLayout | None = None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        self.encoded.append(input_ids[0].tolist())
        return torch.zeros(1, input_ids.shape[1], 4)

    def decode(self, decoder_input_ids: torch.Tensor, encoder_out: torch.Tensor, *_: object) -> torch.Tensor:
        self.decoded.append(decoder_input_ids[0].tolist())
        step = decoder_input_ids.shape[1] - 1
        logits = torch.zeros(1, decoder_input_ids.shape[1], self.vocab)
        logits[0, -1, self.script[step] if step < len(self.script) else self.eos] = 10.0
        return logits


def test_generation_encodes_once_starts_from_pad_and_stops_at_eos(tokenizer_path: Path) -> None:
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    special: SpecialTokens = load_special_tokens(tokenizer_path)
    script = tokenizer.encode(" the model writes").ids
    model = Scripted(script, special.eos, tokenizer.get_vocab_size())
    assert generate_seq2seq(model, tokenizer, "reads", special, temperature=0.0) == " the model writes"
    assert model.encoded == [tokenizer.encode("reads").ids + [special.eos]]
    assert model.decoded == [[special.pad, *script[:i]] for i in range(len(script) + 1)]
