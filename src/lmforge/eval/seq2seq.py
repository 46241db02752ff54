"""Generation from an encoder-decoder: encode the input texts once, then sample the decoder.

Works with any encoder-decoder (T5Model, BartModel) that has `.cfg.max_seq_len` and
- `encode(input_ids [B, S], layout=None, position_ids=None) -> encoder_out [B, S, d]`,
- `decode(decoder_input_ids [B, T], encoder_out, layout=None, ..., cache=None) -> logits [B, T, V]`
  (`layout` is the encoder's, for the cross mask).
With a KV cache (when `decode` takes one) each step runs the decoder on the new token only, and every
layer projects the encoder output to cross-attention keys and values once; without, every step re-runs
the decoder over everything generated so far. Inputs of different lengths are right-padded behind a
padding layout: positions still start at 0 and nothing attends to the padding, so each row decodes as
if alone. The decoder rows all start from the same token, so they need no padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import Tokenizer
from torch import nn

from lmforge.eval.generate import Sampling, accepts_cache, cut_at_stop, sample_loop, seen_tokens, stop_at
from lmforge.models.layers import KVCache
from lmforge.objectives.base import AttentionLayout
from lmforge.tokenizer.special_tokens import SpecialTokens, infer_special_tokens


class Seq2SeqSteps:
    """Next-token logits [B, V] of the decoder rows, each growing by one token per step."""

    def __init__(self, model: nn.Module, sources: Sequence[Sequence[int]], start_id: int, use_cache: bool,
                 device: torch.device | str):
        width = max(len(s) for s in sources)
        ids = torch.tensor([list(s) + [start_id] * (width - len(s)) for s in sources], device=device)
        self.layout = None
        if any(len(s) < width for s in sources):
            real = [[1] * len(s) + [0] * (width - len(s)) for s in sources]
            self.layout = AttentionLayout(causal=False, segment_ids=torch.tensor(real, device=device))
        self.model = model
        self.encoder_out = model.encode(ids, self.layout)
        self.target = torch.full((len(sources), 1), start_id, dtype=torch.long, device=device)
        self.cache = KVCache() if use_cache and accepts_cache(model.decode) else None

    def __call__(self, tokens: torch.Tensor | None) -> torch.Tensor:
        if tokens is not None:
            self.target = torch.cat([self.target, tokens[:, None]], dim=1)
        if self.cache is None:
            return self.model.decode(self.target, self.encoder_out, self.layout)[:, -1]
        new = self.target if tokens is None else tokens[:, None]
        return self.model.decode(new, self.encoder_out, self.layout, cache=self.cache)[:, -1]


@torch.no_grad()
def generate_seq2seq_batch(
    model: nn.Module,
    tokenizer: Tokenizer,
    texts: Sequence[str],
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
) -> list[str]:
    """The decoder's output for each text (text + EOS into the encoder; the decoder starts from the pad
    token, the convention of lmforge's encoder-decoder objectives and of T5), ending before EOS or the
    first stop string, after max_new_tokens, or when the decoder input reaches model.cfg.max_seq_len.
    Text i samples with seed + i; the repetition penalty counts the decoder's tokens (as transformers)."""
    sampling = Sampling(temperature, top_k, top_p, repetition_penalty)
    special = special or infer_special_tokens(tokenizer)
    start_id = special.require("pad", "encoder-decoder generation (the decoder start token)")
    max_len = model.cfg.max_seq_len
    sources = [tokenizer.encode(t, add_special_tokens=False).ids[: max_len - 1] + [special.eos] for t in texts]
    was_training = model.training
    model.eval()
    try:
        steps = Seq2SeqSteps(model, sources, start_id, use_cache, device)
        seen = None
        if repetition_penalty != 1.0:
            seen = seen_tokens([[start_id]] * len(texts), model.cfg.vocab_size, device)
        new = sample_loop(steps, len(texts), sampling, seed, special.eos, min(max_new_tokens, max_len), seen,
                          stop_at(stop, tokenizer), device)
    finally:
        model.train(was_training)
    return [cut_at_stop(tokenizer.decode(row), stop) for row in new]


def generate_seq2seq(
    model: nn.Module,
    tokenizer: Tokenizer,
    text: str,
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
) -> str:
    """One text's output; see generate_seq2seq_batch."""
    return generate_seq2seq_batch(model, tokenizer, [text], special, max_new_tokens, temperature, top_k, top_p,
                                  seed, device, repetition_penalty, stop, use_cache)[0]
