"""E1: validation loss, perplexity and bits-per-byte; the unigram baseline they are judged against."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from lmforge.objectives.base import Objective, loss_sums, scored
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
) -> dict[str, float]:
    """Mean loss (nats per target token) over in-order windows of `dataset`, with ppl, bits/byte and
    the accuracy of the argmax prediction on target tokens (BERT's masked-token accuracy).

    Batches go through the training objective (its randomness keyed by window number, so every eval
    sees the same corruption), so the layout and the loss mask are the ones the model was trained
    with. bits/byte is reported for objectives whose targets are the text itself (next-token LM)."""
    was_training = model.training
    model.eval()
    nats, count, correct, nsp_nats, nsp_count = 0.0, 0.0, 0.0, 0.0, 0.0
    window = objective.window(seq_len)
    windows = sequential_windows(dataset, window, batch_size, max_tokens, tail=getattr(objective, "short_rows", False))
    for batch in tqdm(windows, desc="eval", unit="batch", disable=not progress, dynamic_ncols=True):
        ex = objective(batch).to(device)
        output = model(**ex.model_inputs())
        sums = loss_sums(output, ex)
        nats += float(sums["lm"])
        count += float(ex.loss_mask.sum())
        logits, labels, loss_mask = scored(output, ex)
        hits = (logits.argmax(-1) == labels).float() * loss_mask
        correct += float(hits.sum())
        if "nsp" in sums:
            nsp_nats += float(sums["nsp"])
            nsp_count += ex.nsp_labels.numel()
    model.train(was_training)
    if count == 0:
        raise ValueError(f"validation split has fewer than {window} tokens; nothing to evaluate")
    loss = nats / count
    out = {"loss": loss, "perplexity": math.exp(loss), "accuracy": correct / count, "tokens": int(count)}
    if getattr(objective, "short_rows", False):
        # Bytes covered are estimated from the split's bytes-per-token, exact when the whole split is read.
        out["bits_per_byte"] = nats / math.log(2) / (count * dataset.total_bytes / dataset.n_tokens)
    if nsp_count:
        out["nsp_loss"] = nsp_nats / nsp_count
    return out


def evaluate_sources(
    model: nn.Module,
    sources: dict[str, TokenDataset],
    objective: Objective,
    seq_len: int,
    batch_size: int,
    max_tokens: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """`evaluate` on each source's validation set (max_tokens per source), plus the totals over all
    of them, target-token weighted: {"loss", ..., "sources": {name: metrics}}."""
    per = {}
    for name, ds in sources.items():
        if ds.n_tokens >= 2:
            try:
                per[name] = evaluate(model, ds, objective, seq_len, batch_size, max_tokens, device, progress)
            except ValueError:  # a source too small for one window of this objective: reported as absent
                continue
    if not per:
        raise ValueError(f"no validation source has {objective.window(seq_len)} tokens; nothing to evaluate")
    count = sum(m["tokens"] for m in per.values())
    out: dict[str, Any] = {"tokens": count}
    for key in ("loss", "accuracy", "nsp_loss"):
        if all(key in m for m in per.values()):
            out[key] = sum(m[key] * m["tokens"] for m in per.values()) / count
    out["perplexity"] = math.exp(out["loss"])
    if all("bits_per_byte" in m for m in per.values()):
        # Bytes each source's tokens covered, recovered from its own bits/byte.
        covered = sum(m["loss"] * m["tokens"] / math.log(2) / m["bits_per_byte"] for m in per.values())
        out["bits_per_byte"] = out["loss"] * count / math.log(2) / covered
    out["sources"] = per
    return out


def unigram_cross_entropy(train: dict[str, TokenDataset], val: dict[str, TokenDataset], vocab_size: int) -> float:
    """Cross-entropy (nats/token) on `val` of add-one-smoothed unigram frequencies from `train`:
    what a model that ignores context scores, so a trained model must land clearly below it. The
    counts were stored at tokenize time: nothing is rescanned."""
    counts = sum(ds.counts()[:vocab_size] for ds in train.values())
    probs = (counts + 1) / (counts.sum() + vocab_size)
    val_counts = sum(ds.counts()[:vocab_size] for ds in val.values())
    return float(-(val_counts * np.log(probs)).sum() / val_counts.sum())
