"""T5: length-bucketed dynamic batches. Regrouping a step's padded rows by length keeps every row
exactly once, cuts only columns that are padding in every row of a group, spends no more tokens than
the step did, and leaves the step's loss and gradients as they were."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_mlm import CLS, SYN_SPECIAL, SYN_TOKENIZER, SYN_VOCAB, objective

from lmforge.models import build_model
from lmforge.objectives.base import loss_sums
from lmforge.objectives.bucketing import bucket_by_length
from lmforge.recipe import load_config
from lmforge.tokens.loader import Batch

T = 24


def padded_examples(n: int, rows: int, seed: int):
    """MLM micro-batches where half the rows are short (BERT's short_seq_prob), so padded."""
    mlm = objective(SYN_SPECIAL, SYN_TOKENIZER, seed=seed, nsp=False, short_seq_prob=0.5)
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        tokens = rng.integers(CLS + 1, SYN_VOCAB, (rows, T))
        out.append(mlm(Batch(tokens, np.zeros_like(tokens), np.arange(k * rows, (k + 1) * rows))))
    return out


def real_rows(examples) -> list[tuple]:
    """Each row's non-padding content (input ids, labels, loss mask), as comparable tuples."""
    out = []
    for ex in examples:
        for i in range(ex.input_ids.shape[0]):
            keep = ex.layout.segment_ids[i] != 0
            out.append((tuple(ex.input_ids[i][keep].tolist()), tuple(ex.labels[i][keep].tolist()),
                        tuple(ex.loss_mask[i][keep].tolist())))
    return sorted(out)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 4), rows=st.integers(1, 6), seed=st.integers(0, 1000))
def test_every_row_once_only_padding_cut_and_no_more_tokens(n: int, rows: int, seed: int) -> None:
    examples = padded_examples(n, rows, seed)
    buckets = bucket_by_length(examples)
    assert real_rows(buckets) == real_rows(examples)
    assert sum(b.input_ids.numel() for b in buckets) <= sum(e.input_ids.numel() for e in examples)
    assert all(b.input_ids.numel() <= rows * T for b in buckets)  # the micro-batch's token budget
    for b in buckets:
        assert (b.layout.segment_ids != 0).any(dim=0)[-1]  # the last kept column is real in some row
        assert b.predict_positions.shape == b.input_ids.shape == b.labels.shape
    totals = sum(float(b.loss_mask.sum()) for b in buckets)
    assert totals == sum(float(e.loss_mask.sum()) for e in examples)


def test_the_step_loss_and_gradients_are_unchanged() -> None:
    cfg = load_config(None, ["model.arch=encoder", f"model.vocab_size={SYN_VOCAB}", "model.d_model=32",
                             "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32", "model.nsp_head=false",
                             "objective.name=mlm", "objective.nsp=false", "train.seq_len=24"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    examples = padded_examples(3, 5, seed=4)
    count = sum(float(e.loss_mask.sum()) for e in examples)

    def step(batches) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        total = 0.0
        for ex in batches:
            loss = loss_sums(model(**ex.model_inputs()), ex)["lm"] / count
            loss.backward()
            total += float(loss.detach())
        return total, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss, grads = step(examples)
    buckets = bucket_by_length(examples)
    assert sum(b.input_ids.numel() for b in buckets) < sum(e.input_ids.numel() for e in examples)
    loss2, grads2 = step(buckets)
    assert loss2 == pytest.approx(loss, rel=1e-6)
    for a, b in zip(grads2, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_encoder_decoder_examples_keep_their_decoder_side() -> None:
    from test_span_corruption import objective as span_objective

    span = span_objective()
    window = span.window(32)
    rng = np.random.default_rng(0)
    examples = []
    for k in range(3):
        tokens = rng.integers(13, 900, (4, window))
        examples.append(span(Batch(tokens, np.zeros_like(tokens), np.arange(4 * k, 4 * k + 4))))
    buckets = bucket_by_length(examples)
    rows = sorted((tuple(e.input_ids[i].tolist()), tuple(e.decoder_input_ids[i].tolist()), tuple(e.labels[i].tolist()))
                  for e in examples for i in range(4))
    got = sorted((tuple(b.input_ids[i].tolist()), tuple(b.decoder_input_ids[i].tolist()), tuple(b.labels[i].tolist()))
                 for b in buckets for i in range(b.input_ids.shape[0]))
    assert got == rows  # span corruption fills its rows: nothing to cut, every row intact
    for b in buckets:
        assert b.labels.shape == b.decoder_input_ids.shape == b.loss_mask.shape


def test_row_losses_add_up_to_the_loss_for_sparse_mlm_logits() -> None:
    from lmforge.objectives.base import row_losses

    cfg = load_config(None, ["model.arch=encoder", f"model.vocab_size={SYN_VOCAB}", "model.d_model=32",
                             "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=32", "model.nsp_head=false",
                             "objective.name=mlm", "objective.nsp=false", "train.seq_len=24"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ex = padded_examples(1, 6, seed=2)[0]
    output = model(**ex.model_inputs())
    assert output.dim() == 2  # logits at the masked positions only
    sums, counts = row_losses(output, ex)
    assert sums.shape == counts.shape == (6,)
    assert float(sums.sum().detach()) == pytest.approx(float(loss_sums(output, ex)["lm"].detach()), rel=1e-5)
    assert counts.tolist() == ex.loss_mask.sum(-1).tolist()
