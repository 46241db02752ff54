"""E3: sampling text from a model: temperature (0 = greedy), top-k, top-p, seeded.

No KV cache yet: every step re-runs the model over the whole (cropped) context, O(T^2) per token.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer
from torch import nn

from lmforge.tokenizer.special_tokens import SpecialTokens, infer_special_tokens


@torch.no_grad()
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
) -> str:
    """The continuation of `prompt` (without the prompt), stopping at EOS or after max_new_tokens.
    top_k 0 and top_p 1.0 switch those filters off. `model` must be on `device` and have `.cfg`."""
    check_sampling(temperature, top_k, top_p)
    special = special or infer_special_tokens(tokenizer)
    eos_id = special.eos
    # Packed training puts EOS before every document start, so a leading EOS makes the prompt the
    # beginning of a document (and gives an empty prompt something to condition on).
    ids = [eos_id] + tokenizer.encode(prompt).ids
    generator = torch.Generator(device=device).manual_seed(seed)
    context = torch.tensor([ids], dtype=torch.long, device=device)
    max_len = model.cfg.max_seq_len
    was_training = model.training
    model.eval()
    new_ids: list[int] = []
    try:
        for _ in range(max_new_tokens):
            logits = model(context[:, -max_len:])[0, -1].float()
            next_id = sample_next(logits, temperature, top_k, top_p, generator)
            if next_id == eos_id:
                break
            new_ids.append(next_id)
            context = torch.cat([context, context.new_tensor([[next_id]])], dim=1)
    finally:
        model.train(was_training)
    return tokenizer.decode(new_ids)


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator
) -> int:
    """One token id from logits [V]."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix of the ranking whose mass reaches top_p: drop a token when the
        # tokens ranked above it already reach it (so the most likely token is always kept).
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
