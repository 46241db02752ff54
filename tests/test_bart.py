"""BART: the maths of transformers' BartForConditionalGeneration (positions at row p + 2 included), no
mask leaks across packed segments, padding or the future, HF's initialisation, export and import parity."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from lmforge.config import GenerateConfig, TokenizerConfig
from lmforge.export.bart import (
    bart_exporter,
    bart_hf_config,
    bart_hf_weights,
    bart_refusal,
    export_hf_bart,
    import_hf_bart,
)
from lmforge.models import build_model
from lmforge.models.bart import POSITION_OFFSET
from lmforge.models.encoder_decoder import EncoderDecoderConfig
from lmforge.objectives.base import AttentionLayout
from lmforge.objectives.packing import segment_positions
from lmforge.tokenizer.train import train_tokenizer

VOCAB = 97
# A larger init than training's 0.02 makes one token's influence on other positions plainly visible.
TINY = dict(variant="bart", vocab_size=VOCAB, d_model=32, n_layers=2, n_decoder_layers=1, n_heads=4, max_seq_len=64,
            init_std=0.1)
IDS = {"pad_token_id": 1, "eos_token_id": 0, "bos_token_id": 2, "decoder_start_token_id": 1,
       "forced_bos_token_id": None, "forced_eos_token_id": None}


def tiny(**overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(EncoderDecoderConfig(**{**TINY, **overrides})).eval()


def jitter(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Noise on every parameter and buffer (LayerNorms, biases, final_logits_bias), so a parity check
    fails if any one of them is misplaced or ignored."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.add_(0.1 * torch.randn(t.shape, generator=g))
    return model


def hf_twin(model: torch.nn.Module) -> transformers.BartForConditionalGeneration:
    """transformers' BART of the same config holding our weights (eager attention, fp32)."""
    hf = transformers.BartForConditionalGeneration(bart_hf_config(model.cfg, IDS)).eval()
    hf.config._attn_implementation = "eager"
    missing, unexpected = hf.load_state_dict(bart_hf_weights(model, model.cfg), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight", "model.encoder.embed_tokens.weight",
                                               "model.decoder.embed_tokens.weight"}
    return hf


MODEL = tiny()


def test_shapes_and_encode_decode_compose() -> None:
    x, y = torch.randint(0, VOCAB, (3, 11)), torch.randint(0, VOCAB, (3, 7))
    with torch.no_grad():
        logits = MODEL(x, decoder_input_ids=y)
        hidden = MODEL.encode(x)
        assert hidden.shape == (3, 11, 32)
        assert logits.shape == (3, 7, VOCAB)
        assert torch.equal(MODEL.decode(y, hidden), logits)
    assert MODEL.lm_head.weight is MODEL.shared.weight
    assert tiny(tie_embeddings=False).lm_head.weight is not tiny(tie_embeddings=False).shared.weight
    assert MODEL.encoder.embed_positions.weight.shape == (64 + 2, 32)


@pytest.mark.parametrize("tie", [True, False])
def test_logits_match_transformers_with_encoder_padding(tie: bool) -> None:
    model = jitter(tiny(tie_embeddings=tie))
    hf = hf_twin(model)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, VOCAB, (2, 20), generator=g), torch.randint(0, VOCAB, (2, 9), generator=g)
    keep = torch.ones(2, 20, dtype=torch.long)
    keep[1, 13:] = 0  # the second row is padded
    with torch.no_grad():
        ours = model(x, AttentionLayout(causal=False, segment_ids=keep), decoder_input_ids=y)
        theirs = hf(input_ids=x, attention_mask=keep, decoder_input_ids=y).logits
    assert theirs.abs().max() > 1.0  # not a trivially small comparison
    assert (ours - theirs).abs().max() < 1e-4


def test_positions_read_row_p_plus_two() -> None:
    """Rows 0 and 1 of each table are never read; row 2 is position 0. transformers' own positional
    module agrees on which rows it reads."""
    x, y = torch.randint(0, VOCAB, (1, 6)), torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        base = MODEL(x, decoder_input_ids=y)
        for stack in (MODEL.encoder, MODEL.decoder):
            for row, moves in ((0, False), (1, False), (POSITION_OFFSET, True)):
                saved = stack.embed_positions.weight[row].clone()
                stack.embed_positions.weight[row] += torch.randn(32)  # not a constant: LayerNorm removes those
                assert ((MODEL(x, decoder_input_ids=y) - base).abs().max() > 1e-3) == moves
                stack.embed_positions.weight[row] = saved
        hf_positions = transformers.models.bart.modeling_bart.BartLearnedPositionalEmbedding(64, 32)
        hf_positions.weight.copy_(MODEL.encoder.embed_positions.weight)
        assert torch.equal(hf_positions(x), MODEL.encoder.embed_positions(torch.arange(6)[None] + POSITION_OFFSET))


def pack(lengths: list[int], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment ids 1, 2, ... for runs of `lengths`, then `pad` zeros; positions restart per segment."""
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(pad, dtype=np.int64)])
    return torch.from_numpy(seg[None]).long(), torch.from_numpy(segment_positions(seg[None]))


def test_packed_segments_compute_what_each_alone_computes() -> None:
    """Two (encoder, decoder) pairs packed in one row, positions restarting, equal each pair run alone."""
    g = torch.Generator().manual_seed(3)
    enc = [torch.randint(0, VOCAB, (1, n), generator=g) for n in (5, 7)]
    dec = [torch.randint(0, VOCAB, (1, n), generator=g) for n in (4, 3)]
    enc_seg, enc_pos = pack([5, 7], pad=2)
    dec_seg, dec_pos = pack([4, 3], pad=1)
    x = torch.cat([*enc, torch.zeros(1, 2, dtype=torch.long)], 1)
    y = torch.cat([*dec, torch.zeros(1, 1, dtype=torch.long)], 1)
    with torch.no_grad():
        packed = MODEL(x, AttentionLayout(causal=False, segment_ids=enc_seg), enc_pos, decoder_input_ids=y,
                       decoder_layout=AttentionLayout(causal=True, segment_ids=dec_seg), decoder_position_ids=dec_pos)
        alone = torch.cat([MODEL(e, decoder_input_ids=d) for e, d in zip(enc, dec, strict=True)], 1)
    assert (packed[:, :7] - alone).abs().max() < 1e-5


@st.composite
def packed_rows(draw: st.DrawFn) -> tuple:
    n = draw(st.integers(1, 3))
    enc_lens = [draw(st.integers(1, 4)) for _ in range(n)]
    dec_lens = [draw(st.integers(1, 4)) for _ in range(n)]
    enc_pad, dec_pad = draw(st.integers(0, 3)), draw(st.integers(0, 2))
    S, T = sum(enc_lens) + enc_pad, sum(dec_lens) + dec_pad
    query = draw(st.integers(0, sum(dec_lens) - 1))
    return (enc_lens, enc_pad, dec_lens, dec_pad, query, draw(st.integers(0, S - 1)), draw(st.integers(0, T - 1)),
            draw(st.integers(0, 2**16)))


@settings(max_examples=40, deadline=None)
@given(packed_rows())
def test_no_mask_leaks(row: tuple) -> None:
    """A decoder position's logits change when a token it may see changes (an encoder token of its own
    segment, an earlier decoder token of its segment, itself) and never otherwise (another segment,
    padding, a later decoder position)."""
    enc_lens, enc_pad, dec_lens, dec_pad, query, enc_i, dec_j, seed = row
    enc_seg, enc_pos = pack(enc_lens, enc_pad)
    dec_seg, dec_pos = pack(dec_lens, dec_pad)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, enc_seg.shape, generator=g)
    y = torch.randint(0, VOCAB, dec_seg.shape, generator=g)

    def logits_at_query(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return MODEL(x, AttentionLayout(causal=False, segment_ids=enc_seg), enc_pos, decoder_input_ids=y,
                         decoder_layout=AttentionLayout(causal=True, segment_ids=dec_seg),
                         decoder_position_ids=dec_pos)[0, query]

    base = logits_at_query(x, y)
    own = dec_seg[0, query]
    x2, y2 = x.clone(), y.clone()
    x2[0, enc_i] = (x[0, enc_i] + 1) % VOCAB
    y2[0, dec_j] = (y[0, dec_j] + 1) % VOCAB
    enc_changed = (logits_at_query(x2, y) - base).abs().max() > 1e-5
    dec_changed = (logits_at_query(x, y2) - base).abs().max() > 1e-5
    assert bool(enc_changed) == bool(enc_seg[0, enc_i] == own)
    assert bool(dec_changed) == bool(dec_seg[0, dec_j] == own and dec_j <= query)


def test_init_statistics_match_a_fresh_transformers_bart() -> None:
    cfg = EncoderDecoderConfig(variant="bart", vocab_size=500, d_model=64, n_layers=2, n_heads=4, max_seq_len=128)
    torch.manual_seed(0)
    ours = bart_hf_weights(build_model(cfg), cfg)
    theirs = transformers.BartForConditionalGeneration(bart_hf_config(cfg, IDS)).state_dict()
    assert set(ours) <= set(theirs)
    for name, t in ours.items():
        ref = theirs[name]
        if ref.std() == 0:  # biases, LayerNorms, final_logits_bias: exact constants
            assert torch.equal(t, ref), name
        else:
            assert abs(t.std() / ref.std() - 1) < 0.1, name
            assert abs(t.mean()) < 0.2 * ref.std(), name
    assert torch.allclose(theirs["model.shared.weight"].std(), torch.tensor(cfg.init_std), rtol=0.1)


# ---------------------------------------------------------------- export and import


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    words = ["the", "model", "reads", "tokens", "writes", "café", "naïve", "日本", "def", "return", "x"]
    texts = [" ".join(rng.choice(words) for _ in range(12)) + rng.choice([".", "!\n"]) for _ in range(300)]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(texts, TokenizerConfig(vocab_size=600), path, progress=False)
    return path


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def exported(request: pytest.FixtureRequest, tokenizer_path: Path, tmp_path_factory: pytest.TempPathFactory):
    vocab = Tokenizer.from_file(str(tokenizer_path)).get_vocab_size()
    cfg = EncoderDecoderConfig(variant="bart", vocab_size=vocab, d_model=32, n_layers=2, n_decoder_layers=1,
                               n_heads=4, max_seq_len=48, tie_embeddings=request.param)
    torch.manual_seed(0)
    model = jitter(build_model(cfg)).eval()
    out = export_hf_bart(model, cfg, tokenizer_path, tmp_path_factory.mktemp("export") / "hf", GenerateConfig())
    return model, cfg, out


def test_export_reloads_with_equal_logits_and_tokenizer(exported, tokenizer_path: Path) -> None:
    model, cfg, out = exported
    exporter = bart_exporter()
    assert exporter.name == "BartForConditionalGeneration" and exporter.refusal(cfg, None) is None
    report = exporter.verify(model, out, seed=0, tokenizer=Tokenizer.from_file(str(tokenizer_path)))
    assert report["max_abs_diff"] < 1e-4
    assert report["tokenizer_match"]


def test_export_config_ids_and_files(exported) -> None:
    _, cfg, out = exported
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens.json",
            "generation_config.json"} <= {p.name for p in out.iterdir()}
    hf = json.loads((out / "config.json").read_text())
    special = json.loads((out / "special_tokens.json").read_text())
    assert hf["architectures"] == ["BartForConditionalGeneration"] and hf["tie_word_embeddings"] == cfg.tied
    assert hf["decoder_start_token_id"] == hf["pad_token_id"] == special["pad"]
    assert (hf["eos_token_id"], hf["bos_token_id"]) == (special["eos"], special["bos"])
    assert hf.get("forced_eos_token_id") is None and hf.get("forced_bos_token_id") is None
    assert (hf["max_position_embeddings"], hf["encoder_ffn_dim"], hf["decoder_layers"]) == (48, 128, 1)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["decoder_start_token_id"] == special["pad"] and gen.get("forced_eos_token_id") is None


def test_import_round_trips_our_export(exported) -> None:
    model, cfg, out = exported
    imported, imported_cfg = import_hf_bart(out)
    assert imported_cfg == dataclasses.replace(cfg, n_decoder_layers=1, d_ff=cfg.ff_dim, norm_eps=1e-5,
                                               tie_embeddings=cfg.tied)
    assert (imported.lm_head.weight is imported.shared.weight) == cfg.tied
    x, y = torch.randint(0, cfg.vocab_size, (2, 30)), torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(imported.eval()(x, decoder_input_ids=y), model(x, decoder_input_ids=y))


def save_hf_bart(path: Path, tie: bool, **overrides: object) -> transformers.BartForConditionalGeneration:
    """A random tiny transformers BART (every weight jittered) saved as safetensors to `path`."""
    config = transformers.BartConfig(vocab_size=120, d_model=32, encoder_layers=2, decoder_layers=3,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                     decoder_ffn_dim=48, max_position_embeddings=40, tie_word_embeddings=tie,
                                     **overrides)
    torch.manual_seed(0)
    hf = jitter(transformers.BartForConditionalGeneration(config)).eval()
    if not tie:  # transformers 5 unties the stacks' embeddings too; lmforge reads one in both stacks
        with torch.no_grad():
            hf.model.encoder.embed_tokens.weight.copy_(hf.model.shared.weight)
            hf.model.decoder.embed_tokens.weight.copy_(hf.model.shared.weight)
    hf.save_pretrained(path)
    return hf


@pytest.mark.parametrize("tie", [True, False])
def test_import_of_a_transformers_bart_matches_it(tmp_path: Path, tie: bool) -> None:
    hf = save_hf_bart(tmp_path, tie)
    model, cfg = import_hf_bart(tmp_path)
    assert (cfg.n_layers, cfg.decoder_layers, cfg.ff_dim, cfg.max_seq_len, cfg.tied) == (2, 3, 48, 40, tie)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 120, (2, 25), generator=g), torch.randint(0, 120, (2, 10), generator=g)
    hf.config._attn_implementation = "eager"
    with torch.no_grad():
        theirs = hf(input_ids=x, decoder_input_ids=y).logits
        assert (model.eval()(x, decoder_input_ids=y) - theirs).abs().max() < 1e-4


@pytest.mark.parametrize(("edit", "named"), [
    ({"model_type": "mbart"}, "model_type='mbart'"),
    ({"scale_embedding": True}, "scale_embedding=True"),
    ({"activation_function": "relu"}, "activation_function='relu'"),
    ({"normalize_before": True}, "normalize_before=True"),
    ({"add_final_layer_norm": True}, "add_final_layer_norm=True"),
    ({"decoder_attention_heads": 2}, "decoder_attention_heads=2"),
    ({"decoder_ffn_dim": 64}, "decoder_ffn_dim=64"),
])
def test_import_refuses_what_our_bart_cannot_compute(tmp_path: Path, edit: dict, named: str) -> None:
    save_hf_bart(tmp_path / "src", tie=True)
    copy = tmp_path / "edited"
    shutil.copytree(tmp_path / "src", copy)
    hf = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**hf, **edit}))
    with pytest.raises(ValueError, match=named.replace("(", r"\(")):
        import_hf_bart(copy)


def test_import_refuses_separate_stack_embeddings(tmp_path: Path) -> None:
    hf = save_hf_bart(tmp_path / "src", tie=False)
    with torch.no_grad():
        hf.model.decoder.embed_tokens.weight.add_(1.0)
    hf.save_pretrained(tmp_path / "split")
    with pytest.raises(ValueError, match="decoder.embed_tokens.weight differs from model.shared.weight"):
        import_hf_bart(tmp_path / "split")


def test_export_refuses_what_transformers_bart_cannot_compute(tmp_path: Path, tokenizer_path: Path) -> None:
    cfg = EncoderDecoderConfig(**{**TINY, "norm_eps": 1e-6})
    assert "model.norm_eps=1e-06" in bart_refusal(cfg)
    assert "model.variant='t5'" in bart_refusal(EncoderDecoderConfig(**{**TINY, "variant": "t5"}))
    with pytest.raises(ValueError, match="cannot export to BartForConditionalGeneration: model.norm_eps"):
        export_hf_bart(MODEL, cfg, tokenizer_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
