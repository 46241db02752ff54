"""Growing a model's vocabulary after `lmforge.tokenizer.extend.extend_vocabulary` appended tokens.

Old ids keep their rows, so the model computes exactly what it did on old ids; each new row (input
embedding, output head, output bias) starts as the mean of the old rows (Hewitt, 2021: a new token
then gets about the average logit, instead of a random one that can dominate the softmax), and is
learned by continued pretraining. Rebuild the optimizer afterwards: its state is for the old shapes.
"""

from __future__ import annotations

import torch
from torch import nn

# Where each family keeps its vocabulary-sized tensors: decoder embed_tokens + lm_head, encoder
# word_embeddings + mlm_bias (its head is word_embeddings), T5/BART shared + lm_head (+ BART's
# final_logits_bias buffer).
_EMBEDDINGS = ("embed_tokens", "word_embeddings", "shared")
_HEADS = ("lm_head",)
_BIASES = ("mlm_bias", "final_logits_bias")


def resize_token_embeddings(model: nn.Module, new_vocab_size: int, real_rows: int | None = None) -> nn.Module:
    """Grow `model`'s token embedding, output head and output bias to `new_vocab_size` rows in place,
    keeping tied weights tied; sets model.cfg.vocab_size. Shrinking is refused: ids in use would go.
    `real_rows`: the rows that belong to tokens (default: all). Rows past them are padding a model was
    built with (Pythia's 50,304 rows for 50,277 tokens) and never trained: they are reset to the mean of
    the real rows too, since new tokens take those ids first."""
    old = model.cfg.vocab_size
    real = old if real_rows is None else min(real_rows, old)
    if new_vocab_size < old:
        raise ValueError(f"resize_token_embeddings: {new_vocab_size} < the model's {old}; only growing is supported")
    if real < 1:
        raise ValueError(f"resize_token_embeddings: real_rows must be >= 1, got {real_rows}")
    if new_vocab_size == real == old:
        return model
    embeddings = [m for name in _EMBEDDINGS if isinstance(m := getattr(model, name, None), nn.Embedding)]
    if len(embeddings) != 1:
        raise TypeError(f"resize_token_embeddings: {type(model).__name__} has no single token embedding")
    embedding = embeddings[0]
    heads = [m for name in _HEADS if isinstance(m := getattr(model, name, None), nn.Linear)]
    tied = [h for h in heads if h.weight is embedding.weight]
    embedding.weight = _grown(embedding.weight, new_vocab_size, real)
    embedding.num_embeddings = new_vocab_size
    for head in heads:
        head.weight = embedding.weight if head in tied else _grown(head.weight, new_vocab_size, real)
        head.out_features = new_vocab_size
    for name in _BIASES:
        bias = getattr(model, name, None)
        if isinstance(bias, torch.Tensor):
            grown = _grown(bias, new_vocab_size, real, dim=-1)
            # A buffer stays a buffer: assigning a Parameter to a buffer's name would make it trainable.
            setattr(model, name, grown if isinstance(bias, nn.Parameter) else grown.detach())
    model.cfg.vocab_size = new_vocab_size
    return model


def _grown(old: torch.Tensor, size: int, real: int, dim: int = 0) -> nn.Parameter:
    """`old`'s first `real` rows (along `dim`), then rows up to `size`, each the mean of those."""
    with torch.no_grad():
        kept = old.detach().narrow(dim, 0, real)
        mean = kept.float().mean(dim, keepdim=True).to(old.dtype)
        shape = list(old.shape)
        shape[dim] = size - real
        data = torch.cat([kept, mean.expand(shape)], dim=dim).contiguous()
    return nn.Parameter(data, requires_grad=old.requires_grad)
