"""Deduplication steps: each registered in DEDUP and run map -> reduce -> apply (dedup/base.py)."""

# Imported to register their steps.
from lmforge.data.dedup import exact, minhash, sentences, substring  # noqa: F401
from lmforge.data.dedup.base import DEDUP, DedupAlarm, DedupStep, doc_key, key_task, register_dedup
from lmforge.data.dedup.exact import ExactDedup, text_digest

__all__ = ["DEDUP", "DedupAlarm", "DedupStep", "ExactDedup", "doc_key", "key_task", "register_dedup", "text_digest"]
