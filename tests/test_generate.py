"""Sampling: seeded and reproducible, greedy at temperature 0, and top-k / top-p never sample a token
outside the allowed set."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn

from lmforge.eval.generate import generate
from lmforge.models import build_model
from lmforge.models.decoder import DecoderConfig as ModelConfig

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
