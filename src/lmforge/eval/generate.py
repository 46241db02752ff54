"""E3: sampling text from a decoder, with a KV cache: greedy (temperature 0), temperature, top-k, top-p,
repetition penalty, stop strings, batches of prompts of different lengths, seeded per row.

The pieces, for the encoder-decoder loop in seq2seq.py too:
- `Sampling` holds the options; `pick_tokens` turns next-token logits [B, V] into ids [B] with the
  transformers order of processors (repetition penalty, temperature, top-k, top-p).
- `sample_loop` drives any `step(new_tokens) -> logits` function until EOS, a stop condition or
  max_new_tokens, row by row.
- `generate_ids` decodes token-id prompts (left-padded into one batch: a padding mask and per-row
  positions make each row decode as if alone); `generate` / `generate_batch` take text.

Without a cache (or for a model whose forward takes no `cache`) every step re-runs the model over the
whole context, cropped to the last max_seq_len tokens. With one, only the new token runs; once the
context outgrows max_seq_len the cache is rebuilt from the cropped window each step, which is exactly
what the uncached model sees, so both give the same tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from torch import nn

from lmforge.models.layers import KVCache
from lmforge.objectives.base import AttentionLayout
from lmforge.tokenizer.special_tokens import SpecialTokens, infer_special_tokens

Step = Callable[[torch.Tensor | None], torch.Tensor]  # tokens [B] just sampled (None first) -> logits [B, V]
Done = Callable[[int, list[int]], bool]  # (row, its new ids) -> stop that row


def check_sampling(temperature: float, top_k: int, top_p: float, repetition_penalty: float = 1.0) -> None:
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0 or repetition_penalty <= 0:
        raise ValueError(
            "need temperature >= 0, top_k >= 0, 0 < top_p <= 1, repetition_penalty > 0; "
            f"got {temperature}, {top_k}, {top_p}, {repetition_penalty}"
        )


@dataclass(frozen=True)
class Sampling:
    """Temperature 0 is greedy; top_k 0, top_p 1 and repetition_penalty 1 switch those off."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p, self.repetition_penalty)


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's rule as transformers applies it: a seen token's logit is divided by `penalty` when
    positive and multiplied by it when negative, so > 1 always makes it less likely. seen: bool [B, V]."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits [B, V] with tokens outside the top-k, then outside the nucleus, set to -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix of the ranking whose mass reaches top_p: drop a token when the
        # tokens ranked above it already reach it (so the most likely token is always kept).
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_tokens(logits: torch.Tensor, sampling: Sampling, seen: torch.Tensor | None,
                generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Next ids [B] from logits [B, V]; row i draws from generators[i], so what a row samples does not
    depend on the other rows of its batch."""
    logits = logits.float()
    if sampling.repetition_penalty != 1.0 and seen is not None:
        logits = penalize_repetition(logits, seen, sampling.repetition_penalty)
    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p).softmax(-1)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators, strict=True)])


def seen_tokens(rows: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """bool [B, V]: which ids each row's context holds (what the repetition penalty acts on)."""
    seen = torch.zeros(len(rows), vocab_size, dtype=torch.bool, device=device)
    for i, ids in enumerate(rows):
        seen[i, torch.tensor(list(ids), dtype=torch.long, device=device)] = True
    return seen


def sample_loop(step: Step, n_rows: int, sampling: Sampling, seed: int, eos_id: int, max_new_tokens: int,
                seen: torch.Tensor | None = None, done: Done | None = None,
                device: torch.device | str = "cpu") -> list[list[int]]:
    """Each row's new ids (EOS excluded) until EOS, `done`, or max_new_tokens. Row i samples with seed
    + i. Finished rows keep being fed (their tokens are dropped) until every row is finished."""
    generators = [torch.Generator(device=device).manual_seed(seed + i) for i in range(n_rows)]
    new: list[list[int]] = [[] for _ in range(n_rows)]
    finished = [False] * n_rows
    tokens: torch.Tensor | None = None
    for _ in range(max_new_tokens):
        tokens = pick_tokens(step(tokens), sampling, seen, generators)
        for row, token in enumerate(tokens.tolist()):
            if finished[row] or token == eos_id:
                finished[row] = True
                continue
            new[row].append(token)
            finished[row] = done is not None and done(row, new[row])
        if all(finished):
            break
        if seen is not None:
            seen[torch.arange(n_rows, device=seen.device), tokens] = True
    return new


def accepts_cache(forward: Callable[..., object]) -> bool:
    """Whether a model's forward (or decode) takes a `cache`; models without one decode uncached."""
    return "cache" in inspect.signature(forward).parameters


class DecoderSteps:
    """Next-token logits [B, V] of a batch of left-padded token rows growing by one token per step."""

    def __init__(self, model: nn.Module, prompts: Sequence[Sequence[int]], pad_id: int, use_cache: bool,
                 device: torch.device | str):
        width = max(len(p) for p in prompts)
        self.model, self.max_len = model, model.cfg.max_seq_len
        self.ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
        self.valid = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts], device=device)
        self.padded = any(len(p) < width for p in prompts)  # known here, so no per-step device sync
        self.use_cache = use_cache and accepts_cache(model.forward)
        self.cache: KVCache | None = None

    def __call__(self, tokens: torch.Tensor | None) -> torch.Tensor:
        if tokens is not None:
            self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
            self.valid = torch.cat([self.valid, self.valid.new_ones(len(tokens), 1)], dim=1)
        if tokens is None or self.cache is None or self.cache.length >= self.max_len:
            return self._full_window()
        return self.model(tokens[:, None], cache=self.cache)[:, -1]

    def _full_window(self) -> torch.Tensor:
        """The model over the last max_seq_len tokens, as a fresh sequence (positions from 0 per row)."""
        ids, valid = self.ids[:, -self.max_len:], self.valid[:, -self.max_len:]
        kwargs: dict[str, object] = {}
        if self.padded:
            kwargs["layout"] = AttentionLayout(segment_ids=valid.long())
            kwargs["position_ids"] = (valid.cumsum(1) - 1).clamp(min=0)
        if self.use_cache:
            self.cache = kwargs["cache"] = KVCache()
        return self.model(ids, **kwargs)[:, -1]


def document_start(special: SpecialTokens, lang: str | None = None) -> list[int]:
    """What a prompt starts with so it reads as the start of a training document: the token sequences
    write every document followed by EOS (tokens/shards.py) with no BOS, so inside the training stream
    each document's first token follows EOS. (It also gives an empty prompt a context.) With `lang`,
    that language's tag follows, as tokens.language_tags starts each training document with it: a
    model trained so continues in that language. An unknown code raises MissingRoleError listing the tags."""
    if lang is None:
        return [special.eos]
    return [special.eos, special.lang_tag_id(lang, "generate --lang")]


@torch.no_grad()
def generate_ids(model: nn.Module, prompts: Sequence[Sequence[int]], eos_id: int, sampling: Sampling,
                 max_new_tokens: int = 64, seed: int = 0, device: str | torch.device = "cpu",
                 use_cache: bool = True, done: Done | None = None) -> list[list[int]]:
    """New ids per prompt (each non-empty, given as the model reads it). `model` must be on `device`
    and have `.cfg`; its training flag is restored."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start it with document_start())")
    steps = DecoderSteps(model, prompts, eos_id, use_cache, device)
    seen = seen_tokens(prompts, model.cfg.vocab_size, device) if sampling.repetition_penalty != 1.0 else None
    was_training = model.training
    model.eval()
    try:
        return sample_loop(steps, len(prompts), sampling, seed, eos_id, max_new_tokens, seen, done, device)
    finally:
        model.train(was_training)


def stop_at(stop: Sequence[str], tokenizer: Tokenizer) -> Done | None:
    """A row is done once its decoded continuation contains a stop string."""
    if not stop:
        return None
    return lambda _row, ids: any(s in tokenizer.decode(ids) for s in stop)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest stop string in it."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(cuts)] if cuts else text


def generate_batch(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    special: SpecialTokens | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int = 40,
    top_p: float = 1.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    repetition_penalty: float = 1.0,
    stop: Sequence[str] = (),
    use_cache: bool = True,
    lang: str | None = None,
) -> list[str]:
    """The continuation of each prompt (without the prompt), ending before EOS or the first stop
    string, or after max_new_tokens. Prompt i samples with seed + i, so it gets what it would alone.
    `lang`: a language code of the tokenizer's tags; its tag starts every prompt (document_start)."""
    sampling = Sampling(temperature, top_k, top_p, repetition_penalty)
    special = special or infer_special_tokens(tokenizer)
    start = document_start(special, lang)
    ids = [start + tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
    new = generate_ids(model, ids, special.eos, sampling, max_new_tokens, seed, device, use_cache,
                       stop_at(stop, tokenizer))
    return [cut_at_stop(tokenizer.decode(row), stop) for row in new]


def generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    special: SpecialTokens | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int = 40,
    top_p: float = 1.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    repetition_penalty: float = 1.0,
    stop: Sequence[str] = (),
    use_cache: bool = True,
    lang: str | None = None,
) -> str:
    """One prompt's continuation; see generate_batch."""
    return generate_batch(model, tokenizer, [prompt], special, max_new_tokens, temperature, top_k, top_p, seed,
                          device, repetition_penalty, stop, use_cache, lang)[0]
