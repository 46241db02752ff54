"""Generation from an encoder-decoder: encode the input text once, then sample the decoder.

Works with any encoder-decoder (T5Model, BartModel) that has `.cfg.max_seq_len` and
- `encode(input_ids [B, S], layout=None, position_ids=None) -> encoder_out [B, S, d]`,
- `decode(decoder_input_ids [B, T], encoder_out, layout=None, decoder_layout=None,
  decoder_position_ids=None) -> logits [B, T, V]` (`layout` is the encoder's, for the cross mask).
Uncached: every step re-runs the decoder over everything generated so far; the encoder output is reused.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer
from torch import nn

from lmforge.eval.generate import check_sampling, sample_next
from lmforge.tokenizer.special_tokens import SpecialTokens, infer_special_tokens


@torch.no_grad()
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
) -> str:
    """The decoder's output for `text` (text + EOS into the encoder; the decoder starts from the pad
    token, the convention of lmforge's encoder-decoder objectives and of T5), stopping at EOS, after
    max_new_tokens, or when the decoder input reaches model.cfg.max_seq_len. Temperature 0 is greedy."""
    check_sampling(temperature, top_k, top_p)
    special = special or infer_special_tokens(tokenizer)
    start_id = special.require("pad", "encoder-decoder generation (the decoder start token)")
    max_len = model.cfg.max_seq_len
    source = tokenizer.encode(text).ids[: max_len - 1] + [special.eos]
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    new_ids: list[int] = []
    try:
        encoder_out = model.encode(torch.tensor([source], device=device))
        target = torch.tensor([[start_id]], device=device)
        for _ in range(min(max_new_tokens, max_len)):
            logits = model.decode(target, encoder_out)[0, -1].float()
            next_id = sample_next(logits, temperature, top_k, top_p, generator)
            if next_id == special.eos:
                break
            new_ids.append(next_id)
            target = torch.cat([target, target.new_tensor([[next_id]])], dim=1)
    finally:
        model.train(was_training)
    return tokenizer.decode(new_ids)
