"""Evaluation: perplexity, bits-per-byte, generation."""
