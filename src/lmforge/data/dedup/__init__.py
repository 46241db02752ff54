"""Deduplication steps."""

from lmforge.data.dedup.exact import ExactDedup, text_digest

__all__ = ["ExactDedup", "text_digest"]
