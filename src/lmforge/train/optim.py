"""Optimizers by name. Weight decay applies to matrices only, never to norms or biases (GPT-3 / P1)."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import TrainConfig
from lmforge.registry import Registry

OPTIMIZERS = Registry("optimizer")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied weight once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@OPTIMIZERS.register("adamw")
def adamw(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
    )


@OPTIMIZERS.register("adam")
def adam(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


@OPTIMIZERS.register("sgd")
def sgd(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.beta1)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(cfg.optimizer, "train.optimizer")(model, cfg)
