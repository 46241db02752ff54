"""Pretraining objectives: each turns token windows into an Example with an attention layout."""

from lmforge.objectives import lm  # noqa: F401  (registers "lm")
from lmforge.objectives.base import OBJECTIVES, AttentionLayout, Example, Objective, build_objective

__all__ = ["OBJECTIVES", "AttentionLayout", "Example", "Objective", "build_objective"]
