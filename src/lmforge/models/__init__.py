"""Model architectures, chosen by `model.arch`; each is a plain nn.Module with its own config class.

Construction allocates parameters; `init_weights()` sets them, as the family's reference does. Build
on the meta device, parallelise, then `to_empty` + `init_weights` (torchtitan-style), or let
`build_model` do both on the CPU.
"""

from __future__ import annotations

from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.registry import ARCHITECTURES

# Parameters that map token ids to vectors and back; scaling laws count parameters without them.
EMBEDDING_MODULES = frozenset({"embed_tokens", "embed_positions", "lm_head", "shared", "word_embeddings",
                               "position_embeddings"})


def build_model(cfg: ModelConfig, init: bool = True) -> nn.Module:
    if cfg.vocab_size <= 0:
        raise ValueError(
            f"model.vocab_size must be > 0 (got {cfg.vocab_size}); set it from the trained tokenizer first"
        )
    model = ARCHITECTURES.get(cfg.arch, "model.arch")(cfg)
    if init:
        model.init_weights()
    return model


def count_params(model: nn.Module, non_embedding: bool = False) -> int:
    """Parameters counted once even when shared (tied embeddings); `non_embedding` leaves out the token
    embedding and output projection, the count scaling laws (Kaplan et al.) are fit against."""
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if not (non_embedding and EMBEDDING_MODULES.intersection(name.split(".")))
    )


# Imported last: the architectures register themselves into ARCHITECTURES.
from lmforge.models import decoder, encoder, encoder_decoder  # noqa: E402, F401
