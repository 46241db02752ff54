"""Learning-rate schedules as pure functions of the step, so resuming needs no scheduler state."""

from __future__ import annotations

import math

from lmforge.registry import Registry

SCHEDULES = Registry("schedule")


class _Warmup:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then `decay(progress in [0, 1])`."""

    def __init__(self, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1):
        self.lr = lr
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.min_lr = lr * min_lr_ratio

    def __call__(self, step: int) -> float:
        """LR for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.decay(progress)

    def decay(self, progress: float) -> float:
        raise NotImplementedError


@SCHEDULES.register("cosine")
class Cosine(_Warmup):
    def decay(self, progress: float) -> float:
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))


@SCHEDULES.register("linear")
class Linear(_Warmup):
    def decay(self, progress: float) -> float:
        return self.lr - (self.lr - self.min_lr) * progress


@SCHEDULES.register("constant")
class Constant(_Warmup):
    def decay(self, progress: float) -> float:
        return self.lr
