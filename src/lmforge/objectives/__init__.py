"""Pretraining objectives: each turns a batch of token windows into an Example with a layout."""

from lmforge.objectives import denoising, fim, lm, mix, mlm, prefix_lm, span_corruption, ul2  # noqa: F401  (register)
from lmforge.objectives.base import (
    OBJECTIVES,
    AttentionLayout,
    Batch,
    Example,
    Objective,
    ObjectiveContext,
    build_objective,
    loss_sums,
    masked_nll,
    model_logits,
    row_rng,
)

__all__ = [
    "OBJECTIVES", "AttentionLayout", "Batch", "Example", "Objective", "ObjectiveContext", "build_objective",
    "loss_sums", "masked_nll", "model_logits", "row_rng",
]
