"""Weight initialisation (SPEC A6): N(0, init_std), residual output projections scaled down by
1/sqrt(2 * n_layers) because each layer adds two of them to the residual stream (GPT-2)."""

from __future__ import annotations

import math

from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.layers import RMSNorm

RESIDUAL_PROJECTIONS = ("o_proj", "down_proj")


def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            std = residual_std if name.endswith(RESIDUAL_PROJECTIONS) else cfg.init_std
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
