"""Model architectures, chosen by name from `ARCHITECTURES`; each is a plain nn.Module returning logits."""

from __future__ import annotations

from torch import nn

from lmforge.config import ModelConfig
from lmforge.registry import Registry

ARCHITECTURES = Registry("architecture")

# Parameters that map token ids to vectors and back; scaling laws count parameters without them.
EMBEDDING_PARAMS = ("embed_tokens.", "lm_head.")


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.vocab_size <= 0:
        raise ValueError(
            f"model.vocab_size must be > 0 (got {cfg.vocab_size}); set it from the trained tokenizer first"
        )
    return ARCHITECTURES.get(cfg.arch, "model.arch")(cfg)


def resolve_d_ff(cfg: ModelConfig) -> int:
    """cfg.d_ff, or for 0 the SwiGLU width 8/3 * d_model (as many parameters as a 4x GELU MLP), rounded
    up to a multiple of 64 for matmul-friendly shapes."""
    if cfg.d_ff > 0:
        return cfg.d_ff
    return -(-8 * cfg.d_model // (3 * 64)) * 64  # integer ceil: no float rounding at exact multiples


def count_params(model: nn.Module, non_embedding: bool = False) -> int:
    """Parameters counted once even when shared (tied embeddings); `non_embedding` leaves out the token
    embedding and output projection, the count scaling laws (Kaplan et al.) are fit against."""
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if not (non_embedding and name.startswith(EMBEDDING_PARAMS))
    )


# Imported last: the architectures register themselves into ARCHITECTURES defined above.
from lmforge.models import decoder  # noqa: E402, F401
