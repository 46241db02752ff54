"""P1: optimizers by name, each with its own config under `train.optimizer`.

Weight decay applies to matrices only, never to norms or biases (GPT-3). The algorithms are
torch's own (`torch.optim.AdamW`, `Adafactor`, `Muon`); this module chooses, groups and combines.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmforge.config import OptimizerConfig, check
from lmforge.registry import Registry

OPTIMIZERS = Registry("optimizer", config_base=OptimizerConfig)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied weight once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@dataclass
class AdamWConfig(OptimizerConfig):
    name: str = "adamw"
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8

    def validate(self, where: str) -> None:
        super().validate(where)
        check(where, "beta1", 0.0 <= self.beta1 < 1.0, "must be in [0, 1)", self.beta1)
        check(where, "beta2", 0.0 <= self.beta2 < 1.0, "must be in [0, 1)", self.beta2)
        check(where, "eps", self.eps > 0, "must be > 0", self.eps)


@OPTIMIZERS.register("adamw", config=AdamWConfig)
def adamw(model: nn.Module, cfg: AdamWConfig) -> torch.optim.Optimizer:
    # fused: one kernel over all tensors; 4-5x faster than the default per-tensor loop on CPU
    # (bench/train_speed.py, BENCHMARKS.md), and torch's fastest on CUDA. It cannot mix plain tensors
    # with DTensors (tensor parallelism shards some weights and replicates the rest).
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        fused=_one_tensor_kind(model),
    )


def _one_tensor_kind(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return len({isinstance(p, DTensor) for p in model.parameters()}) == 1


@dataclass
class AdamConfig(AdamWConfig):
    """Adam with L2 (coupled) decay folded into the gradient, as torch.optim.Adam does."""

    name: str = "adam"
    weight_decay: float = 0.0


@OPTIMIZERS.register("adam", config=AdamConfig)
def adam(model: nn.Module, cfg: AdamConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            eps=cfg.eps)


@dataclass
class SGDConfig(OptimizerConfig):
    name: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False

    def validate(self, where: str) -> None:
        super().validate(where)
        check(where, "momentum", 0.0 <= self.momentum < 1.0, "must be in [0, 1)", self.momentum)


@OPTIMIZERS.register("sgd", config=SGDConfig)
def sgd(model: nn.Module, cfg: SGDConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov)


@dataclass
class AdafactorConfig(OptimizerConfig):
    """Adafactor (Shazeer & Stern 2018) as torch implements it: factored second moments for
    matrices, β2_t = 1 - t^beta2_decay (-0.8: the paper's 1 - t^-0.8), relative step sizes (the
    step is lr times the parameter's RMS, floored at eps2, with lr capped by 1/sqrt(t): the paper's
    ρ_t = min(lr, 1/√t)), and update clipping at d = 1."""

    name: str = "adafactor"
    lr: float = 1e-2
    weight_decay: float = 0.0
    beta2_decay: float = -0.8
    eps2: float = 1e-3  # floor of the parameter scale in the relative step
    clip_threshold: float = 1.0  # d: the update's RMS is clipped to d

    def validate(self, where: str) -> None:
        super().validate(where)
        check(where, "beta2_decay", self.beta2_decay <= 0, "must be <= 0", self.beta2_decay)
        check(where, "eps2", self.eps2 > 0, "must be > 0", self.eps2)
        check(where, "clip_threshold", self.clip_threshold > 0, "must be > 0", self.clip_threshold)


@OPTIMIZERS.register("adafactor", config=AdafactorConfig)
def adafactor(model: nn.Module, cfg: AdafactorConfig) -> torch.optim.Optimizer:
    return torch.optim.Adafactor(param_groups(model, cfg.weight_decay), lr=cfg.lr, beta2_decay=cfg.beta2_decay,
                                 eps=(None, cfg.eps2), d=cfg.clip_threshold)


@dataclass
class MuonConfig(AdamWConfig):
    """Muon (Jordan et al. 2024) on the hidden matrices, AdamW on everything else: embeddings, the
    output head, norms and biases, as Muon's authors prescribe. `lr` is Muon's; `adamw_lr` the
    other group's. The update is scaled by 0.2 sqrt(max(A, B)) ("match_rms_adamw", Moonshot's
    rule), so AdamW-tuned learning rates and weight decay carry over."""

    name: str = "muon"
    lr: float = 2e-2
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    adjust_lr: str = "match_rms_adamw"  # or "original" (Keller's sqrt(max(1, A/B)))
    adamw_lr: float = 3e-3

    def validate(self, where: str) -> None:
        super().validate(where)
        check(where, "momentum", 0.0 <= self.momentum < 1.0, "must be in [0, 1)", self.momentum)
        check(where, "ns_steps", self.ns_steps > 0, "must be > 0", self.ns_steps)
        check(where, "adjust_lr", self.adjust_lr in ("match_rms_adamw", "original"),
              "must be 'match_rms_adamw' or 'original'", self.adjust_lr)
        check(where, "adamw_lr", self.adamw_lr > 0, "must be > 0", self.adamw_lr)


def _muon_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hidden matrices, the rest). Embedding tables and the output head are matrices but not
    hidden-layer transforms: their rows are looked up or read out one token at a time."""
    outer = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear):
        outer.add(id(head.weight))
    hidden, rest = [], []
    for p in model.parameters():
        if p.requires_grad:
            (hidden if p.dim() == 2 and id(p) not in outer else rest).append(p)
    return hidden, rest


class Combined:
    """Several optimizers stepped as one: param_groups concatenated (the schedule sets every
    group's lr as a multiple of its own base), one state_dict in torch's format with parameters
    numbered across the parts, so checkpoints treat it like any optimizer."""

    def __init__(self, parts: list[torch.optim.Optimizer]):
        self.parts = parts

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for part in self.parts for g in part.param_groups]

    def step(self) -> None:
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def _offsets(self) -> Iterator[tuple[torch.optim.Optimizer, int]]:
        offset = 0
        for part in self.parts:
            yield part, offset
            offset += sum(len(g["params"]) for g in part.param_groups)

    def state_dict(self) -> dict[str, Any]:
        state, groups = {}, []
        for part, offset in self._offsets():
            sd = part.state_dict()
            state.update({pid + offset: s for pid, s in sd["state"].items()})
            groups += [{**g, "params": [pid + offset for pid in g["params"]]} for g in sd["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = iter(state_dict["param_groups"])
        for part, offset in self._offsets():
            mine = [next(groups) for _ in part.param_groups]
            ids = {pid for g in mine for pid in g["params"]}
            part.load_state_dict({
                "state": {pid - offset: s for pid, s in state_dict["state"].items() if pid in ids},
                "param_groups": [{**g, "params": [pid - offset for pid in g["params"]]} for g in mine],
            })


@OPTIMIZERS.register("muon", config=MuonConfig)
def muon(model: nn.Module, cfg: MuonConfig) -> Combined:
    hidden, rest = _muon_split(model)
    matrices = torch.optim.Muon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                                nesterov=cfg.nesterov, ns_steps=cfg.ns_steps, adjust_lr_fn=cfg.adjust_lr)
    others = [p for p in rest if p.dim() >= 2], [p for p in rest if p.dim() < 2]
    groups = [{"params": others[0], "weight_decay": cfg.weight_decay}, {"params": others[1], "weight_decay": 0.0}]
    adam = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.adamw_lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps)
    return Combined([matrices, adam])


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer | Combined:
    optimizer = OPTIMIZERS.get(cfg.name, "train.optimizer.name")(model, cfg)
    for group in optimizer.param_groups:  # the schedule multiplies each group's own peak
        group["base_lr"] = group["lr"]
    return optimizer
