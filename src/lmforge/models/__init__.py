"""Model architectures, chosen by `model.arch`; each is a plain nn.Module with its own config class.

Construction allocates parameters; `init_weights()` sets them, as the family's reference does. Build
on the meta device, parallelise, then `to_empty` + `init_weights` (torchtitan-style), or let
`build_model` do both on the CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.registry import ARCHITECTURES

# Parameters that map token ids to vectors and back; scaling laws count parameters without them.
EMBEDDING_MODULES = frozenset({"embed_tokens", "embed_positions", "lm_head", "shared", "word_embeddings",
                               "position_embeddings"})


def build_model(cfg: ModelConfig, init: bool = True, device: torch.device | str = "cpu") -> nn.Module:
    """The model `cfg.arch` names. Constructed on the meta device (no memory, no wasted default
    init), then materialised on `device` and initialised by the family's `init_weights()`; with
    init=False it stays on meta, for parallelism to wrap before `materialize` + `init_weights`."""
    if cfg.vocab_size <= 0:
        raise ValueError(
            f"model.vocab_size must be > 0 (got {cfg.vocab_size}); set it from the trained tokenizer first"
        )
    factory = ARCHITECTURES.get(cfg.arch, "model.arch")
    with torch.device("meta"):
        model = factory(cfg)
    if init:
        materialize(model, device)
        model.init_weights()
    return model


def materialize(model: nn.Module, device: torch.device | str) -> nn.Module:
    """`to_empty` that keeps shared parameters shared: to_empty gives every module its own new
    tensor, which would silently untie tied embeddings."""
    users: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                users.setdefault(id(param), []).append((module, name))
    model.to_empty(device=device)
    for (owner, owner_name), *others in users.values():
        for module, name in others:
            setattr(module, name, getattr(owner, owner_name))
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
