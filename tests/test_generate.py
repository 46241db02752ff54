"""Sampling: seeded and reproducible, greedy at temperature 0, top-k / top-p never sample a token
outside the allowed set; the KV cache changes no token (decoders of every position kind, T5, BART);
batched prompts of different lengths decode as each alone; repetition penalty, stop strings, and
greedy parity with transformers.generate on the exported model."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn

from lmforge.eval.generate import filter_logits, generate, generate_batch, penalize_repetition
from lmforge.eval.seq2seq import generate_seq2seq, generate_seq2seq_batch
from lmforge.models import build_model
from lmforge.models.decoder import DecoderConfig as ModelConfig
from lmforge.models.encoder_decoder import EncoderDecoderConfig
from lmforge.models.layers import KVCache
from lmforge.objectives.base import AttentionLayout

WORDS = [f"w{i}" for i in range(2, 32)]
VOCAB = ["<|endoftext|>", "<|pad|>", *WORDS]


def word_tokenizer() -> Tokenizer:
    """One token per whitespace-separated word, so sampled ids can be read back from the text."""
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<|pad|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(VOCAB[:2])
    return tokenizer


class FixedLogits(nn.Module):
    """The same next-token logits at every position; records the longest context it was shown."""

    def __init__(self, logits: list[float], max_seq_len: int = 16):
        super().__init__()
        self.cfg = ModelConfig(vocab_size=len(logits), max_seq_len=max_seq_len)
        self.logits = torch.tensor(logits)
        self.longest = 0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.longest = max(self.longest, input_ids.shape[1])
        return self.logits.expand(*input_ids.shape, -1)


def logits_from_probs(probs: dict[int, float]) -> list[float]:
    """EOS and unlisted tokens get probability ~0, so sampling runs the full length."""
    return [math.log(probs[i]) if i in probs else -30.0 for i in range(len(VOCAB))]


def sampled_ids(model: nn.Module, tokenizer: Tokenizer, seeds: range, **kwargs: object) -> set[int]:
    ids: set[int] = set()
    for seed in seeds:
        text = generate(model, tokenizer, "w2", max_new_tokens=50, seed=seed, **kwargs)
        ids.update(tokenizer.encode(text).ids)
    return ids


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return word_tokenizer()


@pytest.fixture(scope="module")
def decoder() -> nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=len(VOCAB), d_model=32, n_layers=2, n_heads=4, max_seq_len=16, init_std=0.3)
    return build_model(cfg).eval()


def test_top_k_samples_only_the_k_most_likely(tokenizer: Tokenizer) -> None:
    probs = {i: w for i, w in zip(range(2, 10), [0.2, 0.19, 0.18, 0.15, 0.1, 0.08, 0.06, 0.04], strict=True)}
    model = FixedLogits(logits_from_probs(probs))
    got = sampled_ids(model, tokenizer, range(5), temperature=1.5, top_k=3, top_p=1.0)
    assert got == {2, 3, 4}


def test_top_p_samples_only_the_nucleus(tokenizer: Tokenizer) -> None:
    # Cumulative 0.45, 0.75, ...: the smallest set reaching 0.7 is the first two tokens.
    model = FixedLogits(logits_from_probs({5: 0.45, 6: 0.3, 7: 0.15, 8: 0.1}))
    assert sampled_ids(model, tokenizer, range(5), temperature=1.0, top_k=0, top_p=0.7) == {5, 6}
    # Both filters: top-k first keeps 3, the nucleus of those (renormalised: 0.5, 0.33, ...) keeps 2.
    assert sampled_ids(model, tokenizer, range(5), temperature=1.0, top_k=3, top_p=0.8) == {5, 6}
    # Without a filter every token with real probability appears.
    assert sampled_ids(model, tokenizer, range(5), temperature=1.0, top_k=0, top_p=1.0) == {5, 6, 7, 8}


def test_same_seed_same_text(decoder: nn.Module, tokenizer: Tokenizer) -> None:
    def sample(seed: int) -> str:
        return generate(decoder, tokenizer, "w3 w4", max_new_tokens=20, temperature=1.0, top_k=0, top_p=1.0,
                        seed=seed)

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(4)}) > 1, "different seeds should give different samples"


def test_temperature_zero_is_greedy_and_equals_top_k_one(decoder: nn.Module, tokenizer: Tokenizer) -> None:
    greedy = {
        generate(decoder, tokenizer, "w5", max_new_tokens=20, temperature=0.0, top_k=0, top_p=1.0, seed=s)
        for s in range(3)
    }
    top1 = generate(decoder, tokenizer, "w5", max_new_tokens=20, temperature=1.0, top_k=1, top_p=1.0, seed=9)
    assert greedy == {top1}
    assert len(top1.split()) > 5


def test_stops_at_eos(tokenizer: Tokenizer) -> None:
    model = FixedLogits(logits_from_probs({0: 0.9, 4: 0.1}))
    assert generate(model, tokenizer, "w2", max_new_tokens=10, temperature=0.0, top_k=0, top_p=1.0) == ""
    assert model.longest == 2  # EOS + prompt, one forward pass


def test_context_is_cropped_to_max_seq_len(tokenizer: Tokenizer) -> None:
    model = FixedLogits(logits_from_probs({3: 1.0}), max_seq_len=4)
    model.train()
    text = generate(model, tokenizer, "w2 w3 w4 w5 w6", max_new_tokens=10, temperature=0.0, top_k=0, top_p=1.0)
    assert text.split() == ["w3"] * 10
    assert model.longest == 4
    assert model.training, "generate must restore the training flag"


@pytest.mark.parametrize("bad", [{"temperature": -1.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_rejects_invalid_sampling_options(tokenizer: Tokenizer, bad: dict[str, float]) -> None:
    options = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, **bad}
    with pytest.raises(ValueError, match="temperature >= 0"):
        generate(FixedLogits([0.0] * len(VOCAB)), tokenizer, "w2", max_new_tokens=1, **options)


# ---------------------------------------------------------------- KV cache, batching, processors


def decoder_model(**overrides: object) -> nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=len(VOCAB), d_model=32, n_layers=2, n_heads=4, max_seq_len=24, init_std=0.3,
                      **overrides)
    return build_model(cfg).eval()


def seq2seq_model(variant: str) -> nn.Module:
    torch.manual_seed(0)
    cfg = EncoderDecoderConfig(vocab_size=len(VOCAB), variant=variant, d_model=32, n_heads=4, max_seq_len=24,
                               init_std=0.3)
    model = build_model(cfg).eval()
    with torch.no_grad():  # BART's N(0, 0.02) init is near-uniform: widen it so greedy has clear winners
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


DECODERS = {
    "rope": {},
    "gqa": {"n_kv_heads": 2},
    "alibi": {"position": "alibi"},
    "learned": {"position": "learned"},
    "window": {"sliding_window": 5, "attention_sinks": 1},
}
PROMPTS = ["w3 w4 w5 w6 w7", "w9", "", "w2 w2 w8"]


@pytest.mark.parametrize("variant", DECODERS)
def test_cached_logits_equal_the_full_forward(variant: str) -> None:
    model = decoder_model(**DECODERS[variant])
    ids = torch.randint(0, len(VOCAB), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache()
        pieces = [model(ids[:, :5], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(5, 10)]
        pieces.append(model(ids[:, 10:], cache=cache))  # several new tokens after a cached prefix
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", DECODERS)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_and_uncached_decoding_give_the_same_tokens(tokenizer: Tokenizer, variant: str,
                                                           temperature: float) -> None:
    model = decoder_model(**DECODERS[variant])
    # 40 new tokens outgrow max_seq_len (24): the cached path must crop exactly as the uncached one.
    kwargs = dict(max_new_tokens=40, temperature=temperature, top_k=0, top_p=1.0, seed=3)
    cached = generate_batch(model, tokenizer, PROMPTS, use_cache=True, **kwargs)
    uncached = generate_batch(model, tokenizer, PROMPTS, use_cache=False, **kwargs)
    assert cached == uncached
    assert sum(len(text.split()) for text in cached) > 40


@pytest.mark.parametrize("variant", ["rope", "alibi", "learned", "window"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_prompts_decode_as_each_alone(tokenizer: Tokenizer, variant: str, use_cache: bool) -> None:
    model = decoder_model(**DECODERS[variant])
    for temperature in (0.0, 1.0):
        kwargs = dict(max_new_tokens=16, temperature=temperature, top_k=0, top_p=1.0, use_cache=use_cache)
        batched = generate_batch(model, tokenizer, PROMPTS, seed=5, **kwargs)
        alone = [generate(model, tokenizer, p, seed=5 + i, **kwargs) for i, p in enumerate(PROMPTS)]
        assert batched == alone


@pytest.mark.parametrize("variant", ["t5", "bart"])
def test_seq2seq_cached_equals_uncached_and_batched_equals_alone(tokenizer: Tokenizer, variant: str) -> None:
    model = seq2seq_model(variant)
    texts = ["w3 w4 w5 w6 w7 w8", "w9", "w2 w2 w8"]
    for temperature in (0.0, 1.0):
        kwargs = dict(max_new_tokens=30, temperature=temperature, top_k=0, top_p=1.0, seed=2)
        cached = generate_seq2seq_batch(model, tokenizer, texts, use_cache=True, **kwargs)
        assert cached == generate_seq2seq_batch(model, tokenizer, texts, use_cache=False, **kwargs)
        alone = [generate_seq2seq(model, tokenizer, t, **{**kwargs, "seed": 2 + i}) for i, t in enumerate(texts)]
        assert cached == alone
        assert sum(len(text.split()) for text in cached) > 10


def test_seq2seq_cache_projects_the_encoder_output_once(tokenizer: Tokenizer) -> None:
    model = seq2seq_model("t5")
    calls: list[int] = []
    model.decoder.layers[0].cross_attn.k_proj.register_forward_hook(lambda *_: calls.append(1))
    generate_seq2seq(model, tokenizer, "w3 w4", max_new_tokens=10, temperature=0.0, use_cache=True)
    assert len(calls) == 1


def test_cached_decoding_refuses_packed_rows() -> None:
    model = decoder_model()
    layout = AttentionLayout(segment_ids=torch.tensor([[1, 1, 2, 2]]))
    with pytest.raises(ValueError, match="one segment per row"):
        model(torch.tensor([[2, 3, 4, 5]]), layout=layout, cache=KVCache())


def test_repetition_penalty_follows_ctrl() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert penalize_repetition(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, -1.0]]
    assert penalize_repetition(logits, seen, 1.0).tolist() == logits.tolist()


def test_filters_on_fixed_logits() -> None:
    probs = torch.tensor([[0.45, 0.3, 0.15, 0.1], [0.1, 0.15, 0.3, 0.45]])
    kept = filter_logits(probs.log(), top_k=0, top_p=0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]
    kept = filter_logits(probs.log(), top_k=3, top_p=1.0).isfinite()
    assert kept.tolist() == [[True, True, True, False], [False, True, True, True]]
    # The most likely token survives any nucleus.
    assert filter_logits(probs.log(), top_k=0, top_p=0.01).isfinite().sum().item() == 2


def test_repetition_penalty_changes_greedy_choice(tokenizer: Tokenizer) -> None:
    # Logits w3 2.0 > w4 1.5: divided by 1.5 once seen, w3 (1.33) falls behind w4; once both are seen,
    # w3 leads again (1.33 > 1.0). Penalties do not compound: a token is seen or not.
    logits = [-30.0] * len(VOCAB)
    logits[3], logits[4] = 2.0, 1.5
    model = FixedLogits(logits, max_seq_len=32)
    greedy = dict(max_new_tokens=4, temperature=0.0, top_k=0, top_p=1.0)
    assert generate(model, tokenizer, "w9", **greedy).split() == ["w3"] * 4
    assert generate(model, tokenizer, "w9", repetition_penalty=1.5, **greedy).split() == ["w3", "w4", "w3", "w3"]
    assert generate(model, tokenizer, "w3", repetition_penalty=1.5, **greedy).split() == ["w4", "w3", "w3", "w3"]


def test_stop_strings_end_and_cut_the_text(tokenizer: Tokenizer) -> None:
    script = [5, 6, 7, 8, 9, 10]
    model = Scripted(script)
    greedy = dict(max_new_tokens=20, temperature=0.0, top_k=0, top_p=1.0)
    assert generate(model, tokenizer, "w2", stop=["w7", "w9"], **greedy) == "w5 w6 "
    assert model.calls == 3, "generation stops at the step that completes the stop string"
    assert generate(Scripted(script), tokenizer, "w2", stop=["w8 w9"], **greedy) == "w5 w6 w7 "
    assert generate(Scripted(script), tokenizer, "w2", stop=["w30"], **greedy) == "w5 w6 w7 w8 w9 w10"
    assert generate(Scripted(script), tokenizer, "w2", **greedy) == "w5 w6 w7 w8 w9 w10"


def test_prompt_starts_like_a_training_document(tokenizer: Tokenizer) -> None:
    model = Scripted([5])
    generate(model, tokenizer, "w3 w4", max_new_tokens=3, temperature=0.0)
    assert model.first_input == [0, 3, 4]  # EOS precedes every document's first token in the shards


class Scripted(nn.Module):
    """A cache-free decoder that emits `script` after the prompt, then EOS."""

    def __init__(self, script: list[int]):
        super().__init__()
        self.cfg = ModelConfig(vocab_size=len(VOCAB), max_seq_len=64)
        self.script, self.calls, self.first_input = script, 0, None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.first_input is None:
            self.first_input = input_ids[0].tolist()
        step = input_ids.shape[1] - len(self.first_input)
        logits = torch.full((*input_ids.shape, len(VOCAB)), -10.0)
        logits[:, -1, self.script[step] if step < len(self.script) else 0] = 10.0
        self.calls += 1
        return logits


def test_greedy_batch_matches_transformers_generate(tokenizer: Tokenizer, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    from lmforge.export.hf import export_hf_llama

    tokenizer.save(str(tmp_path / "tokenizer.json"))
    model = decoder_model(n_kv_heads=2)
    out = export_hf_llama(model, model.cfg, tmp_path / "tokenizer.json", tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
    prompts = ["w3 w4 w5 w6 w7", "w9", "w2 w2 w8"]
    ours = generate_batch(model, tokenizer, prompts, max_new_tokens=12, temperature=0.0, top_k=0, top_p=1.0)
    rows = [[0, *tokenizer.encode(p).ids] for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[1] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=1)
    for text, row in zip(ours, theirs[:, width:].tolist(), strict=True):
        assert text == tokenizer.decode(row[: row.index(0)] if 0 in row else row)
    penalized = generate(model, tokenizer, "w3 w4 w3", max_new_tokens=12, temperature=0.0, repetition_penalty=1.3)
    one = torch.tensor([rows[0][:1] + tokenizer.encode("w3 w4 w3").ids])
    row = hf.generate(one, max_new_tokens=12, do_sample=False, repetition_penalty=1.3)[0, one.shape[1]:].tolist()
    assert penalized == tokenizer.decode(row[: row.index(0)] if 0 in row else row)
    assert len(penalized.split()) > 3
