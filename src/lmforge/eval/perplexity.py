"""E1: validation loss, perplexity and bits-per-byte; the unigram baseline they are judged against."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lmforge.tokens.loader import sequential_windows
from lmforge.tokens.shards import TokenDataset


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: TokenDataset,
    seq_len: int,
    batch_size: int,
    max_tokens: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, float]:
    """Mean next-token loss (nats) over in-order windows of `dataset`, with ppl and bits/byte."""
    was_training = model.training
    model.eval()
    nats, count = 0.0, 0
    windows = sequential_windows(dataset, seq_len + 1, batch_size, max_tokens)
    for tokens, _ in tqdm(windows, desc="eval", unit="batch", disable=not progress, dynamic_ncols=True):
        t = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).to(device)
        logits = model(t[:, :-1])
        nats += float(F.cross_entropy(logits.float().flatten(0, 1), t[:, 1:].flatten(), reduction="sum"))
        count += t[:, 1:].numel()
    model.train(was_training)
    if count == 0:
        raise ValueError(f"validation split has fewer than {seq_len + 1} tokens; nothing to evaluate")
    loss = nats / count
    # Bytes covered are estimated from the split's bytes-per-token, exact when the whole split is read.
    bytes_covered = count * dataset.total_bytes / dataset.n_tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": nats / math.log(2) / bytes_covered,
        "tokens": count,
    }


def token_counts(dataset: TokenDataset, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, dataset.n_tokens, chunk):
        part = dataset.tokens(start, min(start + chunk, dataset.n_tokens))
        counts += np.bincount(part, minlength=vocab_size)[:vocab_size]
    return counts


def unigram_cross_entropy(train: TokenDataset, val: TokenDataset, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on `val` of add-one-smoothed unigram frequencies from `train`:
    what a model that ignores context scores, so a trained model must land clearly below it."""
    probs = (token_counts(train, vocab_size) + 1) / (train.n_tokens + vocab_size)
    val_counts = token_counts(val, vocab_size)
    return float(-(val_counts * np.log(probs)).sum() / val_counts.sum())
