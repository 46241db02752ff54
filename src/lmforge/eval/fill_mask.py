"""E3 for encoders: fill the [MASK] placeholders of a text with a masked language model."""

from __future__ import annotations

import re

import torch
from tokenizers import Tokenizer
from torch import nn

from lmforge.objectives.base import AttentionLayout, model_logits
from lmforge.tokenizer.special_tokens import SpecialTokens

PLACEHOLDER = "[MASK]"


@torch.no_grad()
def fill_mask(
    model: nn.Module,
    tokenizer: Tokenizer,
    text: str,
    special: SpecialTokens,
    top_k: int = 5,
    device: str | torch.device = "cpu",
) -> str:
    """`text` with each placeholder ("[MASK]" or the tokenizer's own mask token) replaced by the
    model's top prediction, followed by the top_k candidates of each mask with their probabilities:
    `Paris is the capital of France.  ([MASK] 1: capital 0.41 | city 0.12 | ...)`.
    Input is `[CLS] text [SEP]`, as in training; `model` must be on `device`."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    mask_id = special.require("mask", "fill-mask")
    placeholders = {PLACEHOLDER, special.tokens.get("mask", PLACEHOLDER)}
    # A mask takes the space before it: BPE tokens carry their leading space, so the model predicts
    # " capital" (one token, as in training) rather than a bare "capital" after a lone space token.
    pattern = " ?(?:" + "|".join(re.escape(p) for p in sorted(placeholders)) + ")"
    pieces = re.split(pattern, text)
    if len(pieces) == 1:
        raise ValueError(f"fill-mask needs at least one {PLACEHOLDER} placeholder in the text, got {text!r}")
    ids, masks = [special.require("cls", "fill-mask")], []
    for n, piece in enumerate(pieces):
        if n:
            masks.append(len(ids))
            ids.append(mask_id)
        ids.extend(tokenizer.encode(piece, add_special_tokens=False).ids)
    ids.append(special.require("sep", "fill-mask"))
    if len(ids) > model.cfg.max_seq_len:
        raise ValueError(f"fill-mask text is {len(ids)} tokens, more than the model's {model.cfg.max_seq_len}")
    probs = _mask_probabilities(model, ids, masks, device)
    # Special tokens are never a word of the text: rank the others, with their probabilities unchanged.
    probs[:, sorted(i for i in special.ids() if i < probs.shape[1])] = -1.0
    top = probs.topk(min(top_k, probs.shape[1]), dim=-1)
    filled, notes = pieces[0], []
    for n, (p, i) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True)):
        filled += tokenizer.decode([i[0]]) + pieces[n + 1]
        candidates = " | ".join(f"{_show(tokenizer, t)} {q:.2f}" for t, q in zip(i, p, strict=True))
        notes.append(f"({PLACEHOLDER} {n + 1}: {candidates})")
    return filled + "  " + " ".join(notes)


def _mask_probabilities(model: nn.Module, ids: list[int], masks: list[int], device: str | torch.device) -> torch.Tensor:
    """Softmax over the vocabulary at each mask position: [n_masks, vocab]."""
    was_training = model.training
    model.eval()
    try:
        x = torch.tensor([ids], dtype=torch.long, device=device)
        logits = model_logits(model(x, AttentionLayout(causal=False)))
    finally:
        model.train(was_training)
    return logits[0, masks].float().softmax(-1).cpu()


def _show(tokenizer: Tokenizer, token_id: int) -> str:
    """A candidate as text; whitespace-only tokens shown quoted so they stay visible."""
    text = tokenizer.decode([token_id]).strip()
    return text or repr(tokenizer.decode([token_id]))
