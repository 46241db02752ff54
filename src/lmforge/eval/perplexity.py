"""E1: validation loss, perplexity and bits-per-byte; the unigram baseline they are judged against."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from lmforge.objectives.base import Objective, masked_nll
from lmforge.tokens.loader import sequential_windows
from lmforge.tokens.shards import TokenDataset


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: TokenDataset,
    objective: Objective,
    seq_len: int,
    batch_size: int,
    max_tokens: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
    seed: int = 0,
) -> dict[str, float]:
    """Mean loss (nats per target token) over in-order windows of `dataset`, with ppl and bits/byte.

    Batches go through the training objective, so the layout (document masking, prefixes) and the
    loss mask are the ones the model was trained with."""
    was_training = model.training
    model.eval()
    nats, count = 0.0, 0.0
    windows = sequential_windows(dataset, objective.window(seq_len), batch_size, max_tokens)
    for i, (tokens, doc_ids) in enumerate(
        tqdm(windows, desc="eval", unit="batch", disable=not progress, dynamic_ncols=True)
    ):
        ex = objective(tokens, doc_ids, np.random.default_rng([seed, i])).to(device)
        nats += float(masked_nll(model(**ex.model_inputs()), ex.labels, ex.loss_mask))
        count += float(ex.loss_mask.sum())
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
        "tokens": int(count),
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
